"""The samplers a request may pick: A1111's names (and aliases) -> a diffusers scheduler class and its config.

The one table every surface reads (native HTTP and CLI `sampler`, Cog `scheduler`, A1111 `sampler_name` +
`scheduler`). The mapping is diffusers' own table of A1111/k-diffusion equivalents (diffusers docs, "Schedulers"
overview): "Karras" is the same scheduler with `use_karras_sigmas=True`.

"DPM++ SDE" is DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++" (diffusers' "DPM++ 2M SDE"),
not DPMSolverSDEScheduler: that one needs torchsde (not in this service's dependencies) and draws its noise from a
Brownian tree seeded once per call, so a seed would not give the same sprite alone and batched. The multistep SDE
variant, like Euler a, draws its noise with the pipeline's per-image generators.

Torch-free: requests are checked before anything heavy is imported; `scheduler_for` imports diffusers.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from service import config
from service.errors import RequestError


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's
    scheduler: str  # the diffusers class
    options: tuple[tuple[str, Any], ...] = ()  # config overrides of the pipeline's scheduler config
    aliases: tuple[str, ...] = field(default=())  # A1111's (k-diffusion's) other names for it
    karras: str | None = None  # the sampler A1111's scheduler "Karras" turns this one into

    def build(self, base_config: Any) -> Any:
        """A new scheduler of this sampler from the pipeline's scheduler config (one per pipeline call)."""
        import diffusers

        return getattr(diffusers, self.scheduler).from_config(base_config, **dict(self.options))


_KARRAS = (("use_karras_sigmas", True),)
_SDE = (("algorithm_type", "sde-dpmsolver++"),)

SamplerName = Literal[
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE",
    "DPM++ SDE Karras",
    "DDIM",
    "UniPC",
    "Heun",
    "LMS",
    "LMS Karras",
    "PNDM",
]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
_TABLE = (
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m",), karras="DPM++ 2M Karras"),
    Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler", _KARRAS, aliases=("k_dpmpp_2m_ka",)),
    Sampler("DPM++ SDE", "DPMSolverMultistepScheduler", _SDE, ("k_dpmpp_sde", "DPM++ 2M SDE"), "DPM++ SDE Karras"),
    Sampler(
        "DPM++ SDE Karras", "DPMSolverMultistepScheduler", _SDE + _KARRAS, ("k_dpmpp_sde_ka", "DPM++ 2M SDE Karras")
    ),
    Sampler("DDIM", "DDIMScheduler", aliases=("ddim",)),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms",), karras="LMS Karras"),
    Sampler("LMS Karras", "LMSDiscreteScheduler", _KARRAS, aliases=("k_lms_ka",)),
    Sampler("PNDM", "PNDMScheduler", aliases=("PLMS", "plms", "pndm")),
)
SAMPLERS: dict[str, Sampler] = {sampler.name: sampler for sampler in _TABLE}
assert tuple(SAMPLERS) == SAMPLER_NAMES
_BY_NAME = {name.lower(): sampler for sampler in _TABLE for name in (sampler.name, *sampler.aliases)}

# PUNKS_SCHEDULER's values (service/config.py Scheduler): the deployment's default sampler.
DEFAULTS: dict[config.Scheduler, str] = {
    "dpm++": "DPM++ 2M",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "pndm": "PNDM",
}

# A1111 1.9+'s separate `scheduler` (noise schedule) values this server folds into the sampler.
AUTOMATIC, KARRAS = "automatic", "karras"
SCHEDULES = {AUTOMATIC: "Automatic", KARRAS: "Karras"}


def accepted() -> str:
    return ", ".join(SAMPLER_NAMES)


def lookup(name: object, field: str = "sampler") -> Sampler:
    """The sampler of an A1111 name or alias (any case); RequestError naming `field` and the accepted names."""
    if isinstance(name, str) and (sampler := _BY_NAME.get(name.strip().lower())) is not None:
        return sampler
    shown = repr(name)[:120]
    raise RequestError(field, f"unknown sampler {shown}; accepted: {accepted()}")


def with_schedule(sampler: Sampler, schedule: str | None, field: str = "scheduler") -> Sampler:
    """A1111's sampler + scheduler pair as one sampler: "DPM++ 2M" + "Karras" is "DPM++ 2M Karras"."""
    wanted = (schedule or AUTOMATIC).strip().lower()
    if wanted == AUTOMATIC:
        return sampler
    if wanted == KARRAS:
        if sampler.karras is not None:
            return SAMPLERS[sampler.karras]
        if dict(sampler.options).get("use_karras_sigmas"):  # already a Karras one
            return sampler
        karras = ", ".join(s.name for s in _TABLE if s.karras)
        raise RequestError(field, f"'Karras' is accepted with {karras} and the samplers named '... Karras'")
    raise RequestError(field, f"unknown scheduler {schedule!r}; accepted: {', '.join(SCHEDULES.values())}")
