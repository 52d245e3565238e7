"""The `weights` command line: `weights download [...]` (service/weights/download.py) and `weights check
[--verify]` (service/weights/check.py), registered under the main parser of service/cli.py."""

import argparse
import sys

from service.config import REALESRGAN_FILE, Settings
from service.weights.check import check
from service.weights.download import download
from service.weights.fetch import FetchError
from service.weights.source import SOURCE_FORMS


def add_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    weights = commands.add_parser("weights", help="download the weights into weights/, or check what is there")
    actions = weights.add_subparsers(dest="weights_command", required=True)
    get = actions.add_parser(
        "download", help="SD1.5 (fp16, from the Hugging Face Hub), the LoRA, optionally Real-ESRGAN"
    )
    get.add_argument(
        "--lora", metavar="SOURCE", help=f"{SOURCE_FORMS}, optionally #sha256=<hex> (default PUNKS_LORA_URL)"
    )
    get.add_argument(
        "--realesrgan",
        metavar="SOURCE",
        nargs="?",
        const="",
        help=f"also the upscaler; without SOURCE: PUNKS_REALESRGAN_URL ({REALESRGAN_FILE} from its "
        "GitHub release). Implied by PUNKS_UPSCALER=realesrgan",
    )
    get.add_argument("--repo", help="SD1.5 diffusers repo on the hub (default PUNKS_BASE_MODEL_REPO)")
    get.add_argument("--revision", help="branch, tag or commit of that repo (default: main)")
    get.add_argument("--no-base", dest="base", action="store_false", help="skip SD1.5 (only the LoRA / upscaler)")
    get.set_defaults(run=run_download)
    inspect = actions.add_parser("check", help="what is present, missing or wrong (exit 1 when a required file is)")
    inspect.add_argument("--verify", action="store_true", help="also re-hash files against weights/manifest.json")
    inspect.set_defaults(run=run_check)


def run_download(args: argparse.Namespace) -> int:
    """Download, then check what is there: exit 1 when a download failed or a required file is wrong."""
    settings = Settings()
    if args.repo:
        settings = settings.model_copy(update={"base_model_repo": args.repo})
    realesrgan = (args.realesrgan or settings.realesrgan_url) if args.realesrgan is not None else None
    try:
        download(settings, base=args.base, revision=args.revision, lora=args.lora, realesrgan=realesrgan)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return run_check(args)


def run_check(args: argparse.Namespace) -> int:
    findings = check(Settings(), verify=getattr(args, "verify", False))
    for finding in findings:
        print(finding.line())
    failed = [f for f in findings if f.fails]
    print(f"{len(failed)} required file(s) missing or wrong" if failed else "all required weights present and sane")
    return 1 if failed else 0
