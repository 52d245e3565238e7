"""Write .cog/openapi_schema.json, the OpenAPI schema coglet validates Cog inputs against.

`cog build` normally writes this file (its Go CLI parses predict.py statically); without it the cog
server accepts any input at all. This module builds the same document from the runner's real signature
with the cog package's own inspector (cog._inspector.create_predictor: the checks and type mapping
the SDK applies), laid out like the Go generator's output (pkg/schema/openapi_spec.go in cog 0.23).

    python -m devtools.cog_schema            # (re)write .cog/openapi_schema.json
    python -m devtools.cog_schema --check    # exit 1 when the committed file is stale
"""

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNNER_REF = "predict.py:Runner"
TRAIN_REF = "trainer.py:train"  # cog.yaml `train:`: its TrainingInput is what coglet validates trainings against
SCHEMA_PATH = ROOT / ".cog" / "openapi_schema.json"


def _title(name: str) -> str:
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _number(value: float | int) -> float | int:
    """Go writes float64 bounds without a fraction when they are whole (1, not 1.0)."""
    return int(value) if float(value).is_integer() else value


def _input_schema(info: Any, title: str = "Input") -> tuple[dict, dict]:
    from cog import _adt as adt

    properties: dict[str, dict] = {}
    required: list[str] = []
    enums: dict[str, dict] = {}
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        prop: dict[str, Any] = {"x-order": field.order}
        json_type = field.type.json_type()
        if field.choices is not None:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": list(field.choices),
                "type": json_type.get("type", "string"),
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = _title(name)
            prop.update(json_type)
        nullable = field.type.repetition in (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
        has_default = field.default is not None or nullable  # `x: int = Input(default=None)` means required
        if not has_default:
            required.append(name)
        else:
            prop["default"] = field.default
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = _number(field.ge)
        if field.le is not None:
            prop["maximum"] = _number(field.le)
        if field.min_length is not None:
            prop["minLength"] = field.min_length
        if field.max_length is not None:
            prop["maxLength"] = field.max_length
        if field.regex is not None:
            prop["pattern"] = field.regex
        if field.deprecated:
            prop["deprecated"] = True
        properties[name] = prop
    schema: dict[str, Any] = {"title": title, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _json_response(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _inspect(ref: str) -> Any:
    """The cog SDK's view of "file.py:Name" (a runner class or a train function), relative to the repo root."""
    from cog._inspector import create_predictor

    module_path, name = ref.split(":", 1)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_predictor(Path(module_path).stem, name)


VALIDATION_ERROR = {
    "description": "Validation Error",
    **_json_response({"$ref": "#/components/schemas/HTTPValidationError"}),
}
OK_ANY = {"description": "Successful Response", **_json_response({})}


def _exchange(kind: str, input_name: str, output_name: str) -> dict:
    """The <kind>Request and <kind>Response schemas (kind: Prediction or Training)."""
    string = {"type": "string"}
    time = {"type": "string", "format": "date-time"}
    return {
        f"{kind}Request": {
            "title": f"{kind}Request",
            "type": "object",
            "properties": {"id": {"title": "Id", **string}, "input": {"$ref": f"#/components/schemas/{input_name}"}},
        },
        f"{kind}Response": {
            "title": f"{kind}Response",
            "type": "object",
            "properties": {
                "input": {"$ref": f"#/components/schemas/{input_name}"},
                "output": {"$ref": f"#/components/schemas/{output_name}"},
                "id": {"title": "Id", **string},
                "version": {"title": "Version", **string},
                "created_at": {"title": "Created At", **time},
                "started_at": {"title": "Started At", **time},
                "completed_at": {"title": "Completed At", **time},
                "status": {"title": "Status", **string},
                "error": {"title": "Error", **string},
                "logs": {"title": "Logs", **string},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
    }


def _run_paths(route: str, noun: str, summary: str, description: str) -> dict:
    """POST /<route> and POST /<route>/{<noun>_id}/cancel (predictions or trainings)."""
    kind = noun.capitalize()
    return {
        f"/{route}": {
            "post": {
                "summary": summary,
                "description": description,
                "operationId": f"{summary.lower()}_{route}_post",
                "requestBody": _json_response({"$ref": f"#/components/schemas/{kind}Request"}),
                "responses": {
                    "200": {
                        "description": "Successful Response",
                        **_json_response({"$ref": f"#/components/schemas/{kind}Response"}),
                    },
                    "422": VALIDATION_ERROR,
                },
            }
        },
        f"/{route}/{{{noun}_id}}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": f"cancel_{route}__{noun}_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": f"{kind} Id", "type": "string"},
                        "name": f"{noun}_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": OK_ANY, "422": VALIDATION_ERROR},
            }
        },
    }


def build_schema(ref: str = RUNNER_REF, train_ref: str | None = TRAIN_REF) -> dict:
    """The OpenAPI 3.0.2 document for the runner `ref` ("file.py:Class", relative to the repo root) and, where
    given, the train function `train_ref` ("file.py:function"), as `cog build` writes it for cog.yaml's
    `run:` and `train:`."""
    import cog

    info = _inspect(ref)
    input_schema, enums = _input_schema(info)
    schemas = {
        "Input": input_schema,
        "Output": info.output.json_type(),
        **enums,
        **_exchange("Prediction", "Input", "Output"),
        "Status": {
            "title": "Status",
            "description": "An enumeration.",
            "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
            "type": "string",
        },
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }
    paths = {
        "/": {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": OK_ANY}}},
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": OK_ANY},
            }
        },
        **_run_paths("predictions", "prediction", "Predict", "Run a single prediction on the model"),
    }
    if train_ref is not None:
        train = _inspect(train_ref)
        train_input, train_enums = _input_schema(train, "TrainingInput")
        schemas |= {
            "TrainingInput": train_input,
            "TrainingOutput": train.output.json_type() | {"title": "TrainingOutput"},
            **train_enums,
            **_exchange("Training", "TrainingInput", "TrainingOutput"),
        }
        paths |= _run_paths("trainings", "training", "Train", "Run a single training on the model")
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog.__version__},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def is_current(committed: dict, generated: dict) -> bool:
    """Equal but for info.version (the cog version that wrote it): `cog build` may rewrite the file."""
    strip = lambda d: {k: v for k, v in d.items() if k != "info"}  # noqa: E731
    return strip(committed) == strip(generated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.cog_schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed schema is stale")
    parser.add_argument("--output", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    schema = build_schema()
    if args.check:
        if not args.output.is_file() or not is_current(json.loads(args.output.read_text()), schema):
            print(f"{args.output} is stale: run `python -m devtools.cog_schema`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(schema))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
