"""What a DAG trigger may ask for: the one place that says it.

Whoever may press "Trigger" (UI, `airflow dags trigger`, the REST API) is not trusted with policy.
A run's conf may only pick a recipe *by name* from the recipe folders, nudge a short allowlist of
`train.*` knobs within bounds, name inbox files, point `inbox` inside the configured roots, ask for
the quick evaluation where the policy allows it, and ask that a person approve the promotion
(`promotion: review`; never the reverse). Gate thresholds, the guard set, evaluation
sizes and where files are read from come from the server-side policy (shoefix_tasks.policy) only.

The same rules are enforced three times, from one source:
- `param_schemas` feeds the DAGs' `Param`s, so the UI form and Airflow's own validation agree;
- the api-server plugin (plugins/shoefix_trigger_guard.py) runs `validate_conf` on
  `POST .../dagRuns` and backfills and answers 400 before any run exists (Airflow accepts
  unknown conf keys and NaN numbers, which Param schemas alone cannot refuse);
- the first task of every ShoeFix DAG runs `validate_conf` again, for runs that never went
  through the REST API (`airflow dags trigger`, `dags test -c`), and the tasks after it use only
  the validated values it returns.

Pure Python, no Airflow, nothing heavy: the api-server imports it on a trigger request.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from shoefix_tasks.config import Settings, list_recipes, load_recipe
from shoefix_tasks.errors import PermanentError
from shoefix_tasks.intake.inbox import unsafe_name
from shoefix_tasks.policy import Policy, load_policy


class TriggerRefused(PermanentError, ValueError):
    """A trigger's conf asked for something it may not; the message says what and why."""


@dataclass(frozen=True)
class Knob:
    """One overridable `train.*` key: its JSON type and bounds (inclusive)."""

    kind: str  # "number" | "integer" | "string"
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    forbid: tuple[int, ...] = ()  # values inside the bounds that are still refused
    description: str = ""

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "description": self.description}
        if self.choices:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"], out["maximum"] = self.minimum, self.maximum
        if self.forbid:
            out["not"] = {"enum": list(self.forbid)}
        return out


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Training knobs only: nothing here changes what the model *is* (model.*, lora.*, quant.*) or how
# it is judged (eval.*, the gate). Bounds keep a run inside what a worker can finish.
TRAIN_OVERRIDES: dict[str, Knob] = {
    "learning_rate": Knob("number", 1e-6, 1e-2, description="peak learning rate"),
    "num_train_epochs": Knob("number", 0.1, 20, description="epochs (ignored when max_steps > 0)"),
    "max_steps": Knob("integer", -1, 100_000, forbid=(0,), description="-1 = by epochs, else 1..100000"),
    "per_device_train_batch_size": Knob("integer", 1, 256, description="micro-batch per device"),
    "gradient_accumulation_steps": Knob("integer", 1, 128, description="micro-batches per optimizer step"),
    "warmup_steps": Knob("integer", 0, 10_000, description="linear warmup steps"),
    "weight_decay": Knob("number", 0, 1, description="AdamW weight decay"),
    "max_length": Knob("integer", 32, 8192, description="tokens per training example"),
    "seed": Knob("integer", 0, 2**31 - 1, description="training seed"),
    "lr_scheduler_type": Knob("string", choices=SCHEDULERS, description="learning-rate schedule"),
}

RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_REASON_CHARS = 5
MAX_REASON_CHARS = 2000
MAX_FILES = 1000
MAX_INBOX_CHARS = 4096
RETRAIN_KEYS = {"shoefix_weekly_retrain": ("recipe", "overrides", "promotion"),
                "shoefix_urgent_update": ("reason", "inbox", "files", "recipe", "evaluation", "overrides", "promotion")}
POLICY_MODE = "policy"  # `promotion` param: use the policy's mode (the default)
DAG_KEYS: dict[str, tuple[str, ...]] = {**RETRAIN_KEYS, "shoefix_rollback": ("version", "reason", "force"),
                                        "shoefix_inbox_watch": ()}


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


def _check_knob(key: str, knob: Knob, value: Any) -> Any:
    where = f"overrides: train.{key}"
    if knob.kind == "string":
        if value not in knob.choices:
            raise TriggerRefused(f"{where} must be one of {list(knob.choices)}, got {value!r}")
        return value
    if knob.kind == "integer" and not _is_int(value):
        raise TriggerRefused(f"{where} must be an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TriggerRefused(f"{where} must be a finite number, got {value!r}")
    value = int(value) if knob.kind == "integer" else value
    if not knob.minimum <= value <= knob.maximum or value in knob.forbid:
        extra = f" and not {list(knob.forbid)}" if knob.forbid else ""
        raise TriggerRefused(f"{where} = {value!r} is out of bounds [{knob.minimum:g}, {knob.maximum:g}]{extra}")
    return value


def check_overrides(value: Any) -> list[str]:
    """`{"train.learning_rate": 1e-4}` -> `["train.learning_rate=0.0001"]` (load_recipe's form)."""
    if isinstance(value, list):
        raise TriggerRefused('overrides must be a JSON object such as {"train.learning_rate": 0.0001}; '
                             'the list form ["section.key=value"] is no longer accepted')
    if not isinstance(value, dict):
        raise TriggerRefused(f"overrides must be a JSON object, got {type(value).__name__}")
    out = []
    for full, raw in sorted(value.items()):
        section, _, key = str(full).partition(".")
        if section != "train" or key not in TRAIN_OVERRIDES:
            why = ("gate, guard and evaluation settings come from the server-side policy"
                   if section in ("gate", "eval", "evaluation", "policy") else
                   f"only these train.* keys may be overridden: {sorted(TRAIN_OVERRIDES)}")
            raise TriggerRefused(f"overrides: {full!r} may not be set by a trigger ({why})")
        out.append(f"train.{key}={json.dumps(_check_knob(key, TRAIN_OVERRIDES[key], raw))}")
    return out


def check_recipe(value: Any) -> str:
    if (not isinstance(value, str) or not RECIPE_NAME.match(value) or ".." in value
            or value.lower().endswith((".yaml", ".yml"))):
        raise TriggerRefused(f"recipe must be a recipe name (letters, digits, '.', '_', '-'; no path, no .yaml), "
                             f"got {value!r}")
    if value not in list_recipes():
        raise TriggerRefused(f"no recipe named {value!r}; known recipes: {list_recipes()}")
    return value


def check_reason(value: Any) -> str:
    if not isinstance(value, str) or len(re.sub(r"\s", "", value)) < MIN_REASON_CHARS:
        raise TriggerRefused(f"reason must be text with at least {MIN_REASON_CHARS} non-whitespace characters")
    if len(value) > MAX_REASON_CHARS:
        raise TriggerRefused(f"reason is longer than {MAX_REASON_CHARS} characters")
    return value.strip()


def check_files(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(f, str) for f in value):
        raise TriggerRefused("files must be a list of inbox-relative file names")
    if len(value) > MAX_FILES:
        raise TriggerRefused(f"files names more than {MAX_FILES} files")
    for name in value:
        if why := unsafe_name(name):
            raise TriggerRefused(f"files entry {name!r} refused: {why}")
    return list(value)


def _local(path: str) -> str | None:
    """A local filesystem path for a plain path or a file:// URI; None for any other URI."""
    if "://" not in path:
        return path
    parts = urlsplit(path)
    return unquote(parts.path) if parts.scheme == "file" and parts.netloc in ("", "localhost") else None


def _inside_uri(uri: str, root: str) -> bool:
    u, r = urlsplit(uri), urlsplit(root)
    if u.scheme.lower() != r.scheme.lower() or u.netloc != r.netloc:
        return False
    top = r.path.rstrip("/")
    return u.path.rstrip("/") == top or u.path.startswith(top + "/")


def check_inbox(value: Any, roots: list[str]) -> str | None:
    """None for the configured inbox; else the inbox, normalized, if it lies inside one of `roots`."""
    if not isinstance(value, str):
        raise TriggerRefused("inbox must be a path or URI string (empty: the configured inbox)")
    if not value.strip():
        return None
    if len(value) > MAX_INBOX_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise TriggerRefused("inbox is too long or contains control characters")
    segments = re.split(r"[/\\]", unquote(value))
    if ".." in segments or "." in segments[1:]:
        raise TriggerRefused(f"inbox {value!r} refused: '..' and '.' path segments are not allowed")
    local = _local(value)
    allowed = ", ".join(roots) or "(none)"
    if local is not None:
        if not os.path.isabs(local):
            raise TriggerRefused(f"inbox {value!r} refused: give an absolute path inside {allowed}")
        real = os.path.realpath(local)
        for root in filter(None, map(_local, roots)):
            top = os.path.realpath(root)
            if os.path.commonpath([real, top]) == top:
                return real
        raise TriggerRefused(f"inbox {value!r} refused: it resolves to {real}, outside the allowed inbox roots "
                             f"({allowed})")
    if urlsplit(value).query or urlsplit(value).fragment:
        raise TriggerRefused(f"inbox {value!r} refused: no query or fragment in an inbox URI")
    if any(_local(r) is None and _inside_uri(value, r) for r in roots):
        return value.rstrip("/")
    raise TriggerRefused(f"inbox {value!r} refused: outside the allowed inbox roots ({allowed})")


def check_version(value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= 10**9:
        raise TriggerRefused(f"version must be a registry version number (an integer >= 1), got {value!r}")
    return int(value)


def check_force(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TriggerRefused(f"force must be true or false, got {value!r}")
    return value


def check_promotion(value: Any, policy: Policy) -> str:
    """The run's promotion mode. A trigger may ask for `review` (hold this one run for a person) but
    never for `auto` when the policy says `review`: that would let whoever may press "Trigger" skip
    the approval the operator requires. Asking for `auto` under an `auto` policy changes nothing."""
    from shoefix_tasks.policy import stricter_mode

    if value not in (POLICY_MODE, "auto", "review"):
        raise TriggerRefused(f"promotion must be 'policy', 'auto' or 'review', got {value!r}")
    configured = policy.promotion.mode
    if value == "auto" and configured == "review":
        raise TriggerRefused("promotion 'auto' refused: the server's policy requires a review of every promotion "
                             "(promotion.mode: review); a trigger may tighten the policy, never loosen it")
    return stricter_mode(configured, None if value == POLICY_MODE else value)


def validate_conf(dag_id: str, conf: Any, policy: Policy | None = None,
                  settings: Settings | None = None) -> dict[str, Any]:
    """The normalized values a run of `dag_id` uses, or `TriggerRefused` with one clear message.

    `conf` is what the trigger sent (or the run's params: declared defaults plus the conf).
    """
    if dag_id not in DAG_KEYS:
        raise TriggerRefused(f"DAG {dag_id!r} has no trigger rules (shoefix_tasks.ops.trigger.DAG_KEYS)")
    conf = {} if conf is None else conf
    if not isinstance(conf, dict):
        raise TriggerRefused(f"conf must be a JSON object, got {type(conf).__name__}")
    allowed = DAG_KEYS[dag_id]
    unknown = sorted(set(conf) - set(allowed))
    if unknown:
        raise TriggerRefused(f"{dag_id} does not accept conf key(s) {unknown}; allowed: {list(allowed)}"
                             + ("" if allowed else " (none)") + ". Gate, guard and evaluation settings come "
                             "from the server-side policy (SHOEFIX_POLICY), never from a trigger")
    if dag_id == "shoefix_inbox_watch":
        return {}
    if dag_id == "shoefix_rollback":
        for key in ("version", "reason"):
            if key not in conf:
                raise TriggerRefused(f"{dag_id} needs {key!r}")
        return {"version": check_version(conf["version"]), "reason": check_reason(conf["reason"]),
                "force": check_force(conf.get("force", False))}

    policy = policy or load_policy()
    urgent = dag_id == "shoefix_urgent_update"
    if urgent and "reason" not in conf:
        raise TriggerRefused(f"{dag_id} needs a 'reason' (why this cannot wait for the weekly run)")
    recipe = check_recipe(conf.get("recipe", "default"))
    overrides = check_overrides(conf.get("overrides", {}))
    try:
        load_recipe(recipe, overrides)  # the combination must make a valid recipe
    except (ValueError, FileNotFoundError) as err:
        raise TriggerRefused(f"recipe {recipe!r} with overrides {overrides}: {err}") from err
    evaluation = conf.get("evaluation", "full")
    if evaluation not in ("full", "quick"):
        raise TriggerRefused(f"evaluation must be 'full' or 'quick', got {evaluation!r}")
    if evaluation == "quick" and not policy.trigger.allow_quick:
        raise TriggerRefused("the quick evaluation is turned off by the server's policy (trigger.allow_quick)")
    roots = [(settings or Settings.from_env()).inbox, *policy.trigger.inbox_roots]
    return {"recipe": recipe, "overrides": overrides, "evaluation": evaluation, "quick": evaluation == "quick",
            "reason": check_reason(conf["reason"]) if urgent else None,
            "inbox": check_inbox(conf.get("inbox", ""), roots), "files": check_files(conf.get("files", [])),
            "promotion": check_promotion(conf.get("promotion", POLICY_MODE), policy)}


def param_schemas(dag_id: str) -> dict[str, dict[str, Any]]:
    """Keyword arguments for one `airflow.sdk.Param` per conf key of `dag_id` (default, description,
    JSON schema), built from the rules above so the form and Airflow's validation agree with them."""
    reason = {"type": "string", "minLength": MIN_REASON_CHARS, "maxLength": MAX_REASON_CHARS,
              "pattern": r"(?:\S\s*){" + str(MIN_REASON_CHARS) + "}"}
    schemas: dict[str, dict[str, Any]] = {
        "recipe": {"default": "default", "type": "string", "enum": list_recipes(),
                   "description": "recipe name (from the recipe folders; never a path)"},
        "overrides": {"default": {}, "type": "object", "additionalProperties": False,
                      "properties": {f"train.{k}": v.schema() for k, v in TRAIN_OVERRIDES.items()},
                      "description": 'training overrides, e.g. {"train.learning_rate": 0.0001}; only '
                                     f"train.{{{','.join(TRAIN_OVERRIDES)}}} within bounds"},
        "reason": {**reason, "description": "why (kept with the run and in the champion history)"},
        "inbox": {"default": "", "type": "string", "maxLength": MAX_INBOX_CHARS,
                  "description": "inbox path or URI inside the configured inbox roots (empty: the configured inbox)"},
        "files": {"default": [], "type": "array", "maxItems": MAX_FILES, "items": {"type": "string", "minLength": 1},
                  "description": "inbox-relative files (empty: all new)"},
        "evaluation": {"default": "full", "type": "string",
                       "enum": ["full", "quick"] if load_policy().trigger.allow_quick else ["full"],
                       "description": "full holdout, or the policy's quick stratified sample"},
        "promotion": {"default": POLICY_MODE, "type": "string",
                      "enum": [POLICY_MODE, "review"] + (["auto"] if load_policy().promotion.mode == "auto" else []),
                      "description": "who moves champion after the gate passes: the policy's mode, or 'review' "
                                     "(a person approves); 'auto' is refused when the policy says review"},
        "version": {"type": "integer", "minimum": 1, "maximum": 10**9,
                    "description": "registry version to make champion again"},
        "force": {"default": False, "type": "boolean",
                  "description": "roll back even to a version the gate did not promote (recorded)"},
    }
    return {key: schemas[key] for key in DAG_KEYS[dag_id]}
