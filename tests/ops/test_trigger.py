"""shoefix_tasks.ops.trigger: every rule of what a DAG trigger may ask for, bounds edges included, and the
Param schemas agree with `validate_conf` wherever a JSON schema can say the same thing."""

from __future__ import annotations

import dataclasses
import os

import jsonschema
import pytest

from shoefix_tasks.config import Settings
from shoefix_tasks.ops.trigger import TRAIN_OVERRIDES, TriggerRefused, param_schemas, validate_conf
from shoefix_tasks.policy import Policy, TriggerPolicy

URGENT, WEEKLY, ROLLBACK = "shoefix_urgent_update", "shoefix_weekly_retrain", "shoefix_rollback"
REASON = "v3 gives wrong drying temperatures"


@pytest.fixture()
def inbox(tmp_path, monkeypatch) -> Settings:
    """Settings whose configured inbox is `<tmp>/inbox` (with a subfolder and a neighbour outside)."""
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    (tmp_path / "inbox" / "urgent").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    return dataclasses.replace(Settings.from_env(), inbox=str(tmp_path / "inbox"))


def refused(dag_id: str, conf, match: str, **kw) -> str:
    with pytest.raises(TriggerRefused, match=match) as err:
        validate_conf(dag_id, conf, **kw)
    return str(err.value)


def urgent(inbox_settings, **conf):
    return validate_conf(URGENT, {"reason": REASON, **conf}, settings=inbox_settings)


def test_defaults_are_normalized(inbox):
    assert validate_conf(WEEKLY, {}, settings=inbox) == {
        "recipe": "default", "overrides": [], "evaluation": "full", "quick": False, "reason": None,
        "inbox": None, "files": [], "promotion": "auto"}
    out = urgent(inbox, evaluation="quick", files=["urgent/fix.jsonl"], recipe="seed")
    assert (out["quick"], out["files"], out["recipe"], out["reason"]) == (True, ["urgent/fix.jsonl"], "seed", REASON)
    assert validate_conf(ROLLBACK, {"version": 3, "reason": REASON}) == {"version": 3, "reason": REASON,
                                                                          "force": False}
    assert validate_conf(WEEKLY, None, settings=inbox)["recipe"] == "default"  # no conf at all (the cron)


@pytest.mark.parametrize("dag_id,key", [(WEEKLY, "reason"), (WEEKLY, "inbox"), (WEEKLY, "evaluation"),
                                        (URGENT, "gate"), (URGENT, "policy"), (URGENT, "max_quarantine_rate"),
                                        (URGENT, "eval"), (ROLLBACK, "recipe"), ("shoefix_inbox_watch", "x")])
def test_unknown_top_level_keys_are_refused(inbox, dag_id, key):
    conf = {"reason": REASON, "version": 1} if dag_id in (URGENT, ROLLBACK) else {}
    msg = refused(dag_id, {**conf, key: 1}, "does not accept conf key", settings=inbox)
    assert repr(key) in msg and "server-side policy" in msg


def test_unknown_dag_and_non_object_conf():
    refused("shoefix_other", {}, "no trigger rules")
    refused(WEEKLY, ["recipe"], "conf must be a JSON object")


@pytest.mark.parametrize("recipe", ["/etc/passwd", "/tmp/evil.yaml", "../default", "x/../default", "default.yaml",
                                    "default.YML", "..", "a..b", "", "-x", "x" * 65, "de fault", 3, None])
def test_recipe_must_be_a_plain_name(inbox, recipe):
    msg = refused(WEEKLY, {"recipe": recipe}, "recipe must be a recipe name", settings=inbox)
    assert "no path" in msg


def test_recipe_must_be_known(inbox, tmp_path, monkeypatch):
    msg = refused(WEEKLY, {"recipe": "nope"}, "no recipe named 'nope'", settings=inbox)
    assert "default" in msg  # lists the known ones
    # the policy's recipe folders extend the package's
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "mine.yaml").write_text("train: {num_train_epochs: 1}\n")
    (tmp_path / "policy.yaml").write_text(f"trigger: {{recipe_dirs: ['{tmp_path / 'extra'}']}}\n")
    monkeypatch.setenv("SHOEFIX_POLICY", str(tmp_path / "policy.yaml"))
    assert validate_conf(WEEKLY, {"recipe": "mine"}, settings=inbox)["recipe"] == "mine"
    assert "mine" in param_schemas(WEEKLY)["recipe"]["enum"]


def test_overrides_object_form_is_normalized(inbox):
    out = validate_conf(WEEKLY, {"overrides": {"train.learning_rate": 1e-4, "train.max_steps": 3.0,
                                               "train.lr_scheduler_type": "linear", "train.num_train_epochs": 2}},
                        settings=inbox)
    assert out["overrides"] == ['train.learning_rate=0.0001', 'train.lr_scheduler_type="linear"',
                                "train.max_steps=3", "train.num_train_epochs=2"]
    from shoefix_tasks.config import load_recipe

    rec = load_recipe("default", out["overrides"])  # the form load_recipe takes, with the types it wants
    assert (rec.train.learning_rate, rec.train.max_steps, rec.train.lr_scheduler_type) == (1e-4, 3, "linear")
    assert isinstance(rec.train.num_train_epochs, float)


def test_old_list_form_is_refused_with_the_new_form(inbox):
    msg = refused(WEEKLY, {"overrides": ["gate.min_effect=-100"]}, "must be a JSON object", settings=inbox)
    assert '{"train.learning_rate"' in msg and "no longer accepted" in msg
    refused(WEEKLY, {"overrides": "train.seed=1"}, "must be a JSON object", settings=inbox)


@pytest.mark.parametrize("key,value,why", [
    ("gate.min_effect", -100, "server-side policy"), ("eval.latency_samples", 0, "server-side policy"),
    ("eval.include_guard", False, "server-side policy"), ("eval.max_new_tokens", 4, "server-side policy"),
    ("evaluation.quick_questions", 1, "server-side policy"), ("model.base_model", "/tmp/evil", "only these"),
    ("lora.r", 1, "only these"), ("quant.load_in_4bit", True, "only these"), ("train.nope", 1, "only these"),
    ("train.optim", "sgd", "only these"), ("train.languages", ["en"], "only these"), ("learning_rate", 1e-4, "only")])
def test_only_allowlisted_train_keys(inbox, key, value, why):
    msg = refused(WEEKLY, {"overrides": {key: value}}, "may not be set by a trigger", settings=inbox)
    assert repr(key) in msg and why in msg


def _edges():
    for key, knob in TRAIN_OVERRIDES.items():
        if knob.kind == "string":
            yield key, knob.choices[0], True
            yield key, "warmup_then_yolo", False
            yield key, 1, False
            continue
        step = 1 if knob.kind == "integer" else knob.minimum * 1e-3 or 1e-9
        yield key, knob.minimum, key != "max_steps" or knob.minimum not in knob.forbid
        yield key, knob.maximum, True
        yield key, knob.minimum - step, False
        yield key, knob.maximum + step, False
        yield key, True, False  # a JSON boolean is not a number
        yield key, "1", False
        if knob.kind == "integer":
            yield key, knob.minimum + 1.5, False
        else:
            yield key, float("nan"), False
            yield key, float("inf"), False


EDGES = list(_edges())


@pytest.mark.parametrize("key,value,ok", EDGES, ids=[f"{k}={v!r}" for k, v, _ in EDGES])
def test_bounds_edges_and_the_schema_agrees(inbox, key, value, ok):
    conf = {"overrides": {f"train.{key}": value}}
    if ok:
        validate_conf(WEEKLY, conf, settings=inbox)
    else:
        refused(WEEKLY, conf, f"train.{key}", settings=inbox)
    if isinstance(value, float) and value != value:
        return  # NaN: JSON schema's minimum/maximum cannot refuse it; validate_conf does (and the guard)
    schema = param_schemas(WEEKLY)["overrides"]
    try:
        jsonschema.validate(conf["overrides"], schema)
        schema_ok = True
    except jsonschema.ValidationError:
        schema_ok = False
    assert schema_ok == ok


def test_max_steps_zero_is_refused_minus_one_is_epochs(inbox):
    refused(WEEKLY, {"overrides": {"train.max_steps": 0}}, "out of bounds", settings=inbox)
    assert validate_conf(WEEKLY, {"overrides": {"train.max_steps": -1}}, settings=inbox)["overrides"] == [
        "train.max_steps=-1"]


def test_evaluation(inbox):
    refused(URGENT, {"reason": REASON, "evaluation": "sometimes"}, "'full' or 'quick'", settings=inbox)
    no_quick = Policy(trigger=TriggerPolicy(allow_quick=False))
    refused(URGENT, {"reason": REASON, "evaluation": "quick"}, "allow_quick", settings=inbox, policy=no_quick)
    assert validate_conf(URGENT, {"reason": REASON}, settings=inbox, policy=no_quick)["quick"] is False


def test_quick_leaves_the_form_when_the_policy_forbids_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SHOEFIX_POLICY", raising=False)
    assert param_schemas(URGENT)["evaluation"]["enum"] == ["full", "quick"]
    (tmp_path / "policy.yaml").write_text("trigger: {allow_quick: false}\n")
    monkeypatch.setenv("SHOEFIX_POLICY", str(tmp_path / "policy.yaml"))
    assert param_schemas(URGENT)["evaluation"]["enum"] == ["full"]


@pytest.mark.parametrize("reason", ["", "    ", "\t\n  \u3000", "a b c d", "ab   cd", None, 12345])
def test_reason_needs_five_non_whitespace_characters(inbox, reason):
    refused(URGENT, {"reason": reason}, "at least 5 non-whitespace", settings=inbox)
    refused(ROLLBACK, {"version": 1, "reason": reason}, "at least 5 non-whitespace")


def test_reason_edges(inbox):
    assert urgent(inbox, reason="  a b c d e  ")["reason"] == "a b c d e"
    refused(URGENT, {"reason": "x" * 2001}, "longer than", settings=inbox)
    refused(URGENT, {}, "needs a 'reason'", settings=inbox)


@pytest.mark.parametrize("files,match", [
    (["../etc/passwd"], "escapes the inbox"), (["/etc/passwd"], "escapes the inbox"),
    (["-rf.jsonl"], "starts with '-'"), (["a\u202eb.jsonl"], "control or invisible"), ([""], "empty file name"),
    ("urgent/fix.jsonl", "must be a list"), ([1], "must be a list")])
def test_files_keep_the_inbox_name_checks(inbox, files, match):
    refused(URGENT, {"reason": REASON, "files": files}, match, settings=inbox)


def test_inbox_local_paths(inbox, tmp_path):
    root = tmp_path / "inbox"
    assert urgent(inbox, inbox="")["inbox"] is None
    assert urgent(inbox, inbox=str(root))["inbox"] == os.path.realpath(root)
    assert urgent(inbox, inbox=str(root / "urgent"))["inbox"] == os.path.realpath(root / "urgent")
    assert urgent(inbox, inbox=f"file://{root}/urgent")["inbox"] == os.path.realpath(root / "urgent")
    refused(URGENT, {"reason": REASON, "inbox": "/etc"}, "outside the allowed inbox roots", settings=inbox)
    refused(URGENT, {"reason": REASON, "inbox": f"{root}/../other"}, "'..'", settings=inbox)
    refused(URGENT, {"reason": REASON, "inbox": f"{root}/%2e%2e/other"}, "'..'", settings=inbox)
    refused(URGENT, {"reason": REASON, "inbox": f"{root}-evil"}, "outside", settings=inbox)  # not a prefix match
    refused(URGENT, {"reason": REASON, "inbox": "inbox/urgent"}, "absolute path", settings=inbox)
    refused(URGENT, {"reason": REASON, "inbox": f"{root}/\x00x"}, "control characters", settings=inbox)
    refused(URGENT, {"reason": REASON, "inbox": ["x"]}, "path or URI string", settings=inbox)
    # a symlink inside the inbox that points out of it: resolved, refused
    (root / "escape").symlink_to(tmp_path / "other")
    msg = refused(URGENT, {"reason": REASON, "inbox": str(root / "escape")}, "outside", settings=inbox)
    assert os.path.realpath(tmp_path / "other") in msg
    # a policy root admits its own tree
    extra = Policy(trigger=TriggerPolicy(inbox_roots=(str(tmp_path / "other"),)))
    assert validate_conf(URGENT, {"reason": REASON, "inbox": str(root / "escape")}, settings=inbox,
                         policy=extra)["inbox"] == os.path.realpath(tmp_path / "other")


def test_inbox_uris(inbox):
    s3 = Policy(trigger=TriggerPolicy(inbox_roots=("s3://shoefix/inbox",)))
    assert validate_conf(URGENT, {"reason": REASON, "inbox": "s3://shoefix/inbox/urgent"}, settings=inbox,
                         policy=s3)["inbox"] == "s3://shoefix/inbox/urgent"
    assert validate_conf(URGENT, {"reason": REASON, "inbox": "s3://shoefix/inbox/"}, settings=inbox,
                         policy=s3)["inbox"] == "s3://shoefix/inbox"
    for bad, match in [("s3://shoefix/inbox-evil", "outside"), ("s3://other/inbox", "outside"),
                       ("gs://shoefix/inbox", "outside"), ("s3://shoefix/inbox/../secrets", "'..'"),
                       ("s3://shoefix/inbox?x=1", "query"), ("file:///etc", "outside")]:
        refused(URGENT, {"reason": REASON, "inbox": bad}, match, settings=inbox, policy=s3)


def test_inbox_uri_configured_inbox(inbox):
    s = dataclasses.replace(inbox, inbox="s3://shoefix/inbox")
    assert validate_conf(URGENT, {"reason": REASON, "inbox": "s3://shoefix/inbox/u"}, settings=s)["inbox"] == \
        "s3://shoefix/inbox/u"
    refused(URGENT, {"reason": REASON, "inbox": "/tmp"}, "outside", settings=s)


@pytest.mark.parametrize("version", [0, -1, "3", 1.5, True, None, 10**10])
def test_rollback_version(version):
    refused(ROLLBACK, {"version": version, "reason": REASON}, "version must be")


def test_rollback_force_and_required_keys():
    assert validate_conf(ROLLBACK, {"version": 2.0, "reason": REASON, "force": True})["force"] is True
    refused(ROLLBACK, {"version": 2, "reason": REASON, "force": "yes"}, "force must be true or false")
    refused(ROLLBACK, {"reason": REASON}, "needs 'version'")
    refused(ROLLBACK, {"version": 2}, "needs 'reason'")


def test_param_schemas_declare_exactly_the_allowed_keys():
    assert set(param_schemas(WEEKLY)) == {"recipe", "overrides", "promotion"}
    assert set(param_schemas(URGENT)) == {"reason", "inbox", "files", "recipe", "evaluation", "overrides", "promotion"}
    assert set(param_schemas(ROLLBACK)) == {"version", "reason", "force"}
    reason = param_schemas(URGENT)["reason"]
    for text, ok in [("   ", False), ("a b c d", False), ("abcde", True), ("  a b c d e ", True)]:
        try:
            jsonschema.validate(text, {k: v for k, v in reason.items() if k != "description"})
            assert ok, text
        except jsonschema.ValidationError:
            assert not ok, text
    assert param_schemas(WEEKLY)["overrides"]["additionalProperties"] is False
    assert param_schemas(ROLLBACK)["force"]["default"] is False
