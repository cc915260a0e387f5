"""Issue 14 on the tiny model: fair baselines (rag+phi), the oracle, hard retrieval with a reused
content-keyed workspace, drift of the deployed weights, significance, --fail-under, --baseline."""

import json

import pytest
import torch

from regrad_cli.learner import adapt
from regrad_cli.learning.cpt import CPTConfig
from regrad_cli.learning.datasets import load_dataset
from regrad_cli.workspace.documents import DocumentStore
from regrad_cli.learning.evaluation import run_eval
from regrad_cli.learning.evaluation.report import fail_under_message, significance_sentence
from regrad_cli.learning.evaluation.workspace import doc_id
from regrad_cli.lm.generation import answer_nll
from regrad_cli.online.pipeline import step_from_rows
from regrad_cli.lm.prompting import prompt_ids

from conftest import DEMO_DIR, FakeEmbedder
from test_eval import RECORDS, _cfg as eval_cfg, _engine, write_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path)


def _cfg(tmp_path, dataset, **kw):
    kw = {"batch_size": 3, "ppl_max_tokens": 256, "cpt": CPTConfig(lr=1e-2, epochs=1, batch_size=2), **kw}
    return eval_cfg(tmp_path, dataset, **kw)


def _preds(res, dataset, system):
    ds = res["datasets"][dataset]
    return [json.loads(x) for x in open(ds["predictions"]) if json.loads(x)["system"] == system]


def test_rag_phi_differs_from_rag_only_by_the_learner(tmp_path, dataset):
    engine = _engine()
    res = run_eval(_cfg(tmp_path, dataset, systems=["rag", "rag+phi"]), engine=engine, embedder=FakeEmbedder())
    rag, rag_phi = _preds(res, dataset, "rag"), _preds(res, dataset, "rag+phi")
    # Same passages for every question; a non-zero phi changes the answers' likelihood.
    assert [r["docs"] for r in rag] == [r["docs"] for r in rag_phi]
    assert any(a["nll"] != pytest.approx(b["nll"], rel=1e-6) for a, b in zip(rag, rag_phi))
    # With phi's B set to zero the side path adds nothing: rag+phi is then exactly rag.
    with torch.no_grad():
        for name, p in engine.learner.phi_dict().items():
            if name.endswith(".B"):
                p.zero_()
    zeroed = [n for n, p in engine.learner.phi_dict().items() if not bool(p.any())]
    assert zeroed, "no B tensor found to zero"
    res = run_eval(_cfg(tmp_path, dataset, systems=["rag", "rag+phi"], out=str(tmp_path / "out2")), engine=engine,
                   embedder=FakeEmbedder())
    rag, rag_phi = _preds(res, dataset, "rag"), _preds(res, dataset, "rag+phi")
    assert [r["prediction"] for r in rag] == [r["prediction"] for r in rag_phi]
    assert [r["nll"] for r in rag] == pytest.approx([r["nll"] for r in rag_phi], rel=1e-6)
    d = res["datasets"][dataset]["systems"]
    assert d["rag+phi"]["drift"]["ppl_deployed"] == pytest.approx(d["rag"]["drift"]["ppl_deployed"], rel=1e-6)


def test_oracle_applies_exactly_the_gold_gradient(tmp_path, dataset):
    from regrad_cli.online.query import QueryEngine
    from regrad_cli.workspace.config import Workspace

    engine, emb = _engine(), FakeEmbedder()
    res = run_eval(_cfg(tmp_path, dataset, systems=["oracle", "regrad"]), engine=engine, embedder=emb)
    ds = res["datasets"][dataset]
    items = load_dataset(dataset)
    ws = Workspace.open(ds["workspace"]["path"], create=False)
    ws.use_bank_env = False
    qe = QueryEngine(ws, engine=engine, embedder=emb)
    for rec, it in zip(_preds(res, dataset, "oracle"), items):
        gold = doc_id(it.documents[0])
        assert rec["applied"] == [gold] and rec["weights"] == [pytest.approx(1.0)]
        assert rec["gold_weight"] == pytest.approx(1.0) and rec["recall_at_1"] == 1.0
        # Rebuild the answer's weights from the gold row alone and score the gold answer under them.
        rows, bad = qe.corpus.gradients([gold])
        assert not bad
        qvec = emb.embed([it.question])[0]
        step, _ = step_from_rows(engine.learner, [rows[gold]], [qe.corpus.cosines(qvec, [gold])[gold]],
                                 engine.learner.trained_combine, 1.0)
        prompt = prompt_ids(engine.tokenizer, it.question, [], it.kind)
        with adapt.applied(engine.learner, step):
            nll = float(answer_nll(engine.model, engine.tokenizer, [prompt], [it.answers[0]])[0])
        assert rec["nll"] == pytest.approx(nll, rel=1e-4)
    # The gradient matters: the oracle's likelihoods are not the retrieval system's on every question.
    assert ds["systems"]["oracle"]["nll"] != ds["systems"]["regrad"]["nll"] or \
        ds["systems"]["regrad"]["recall_at_1"] == 1.0


def test_hard_retrieval_pool_and_workspace_reuse(tmp_path, dataset):
    engine, emb = _engine(), FakeEmbedder()
    extra = tmp_path / "distractors.jsonl"
    extra.write_text(json.dumps({"id": "x1", "text": "the lighthouse of brenn is painted red and white"}) + "\n")
    cfg = _cfg(tmp_path, dataset, systems=["regrad"], limit=2, corpus=[str(extra)])
    ds = run_eval(cfg, engine=engine, embedder=emb)["datasets"][dataset]
    # Two questions evaluated, but the pool holds every supporting document of the split (5
    # distinct) plus the distractor file's document.
    assert ds["n_items"] == 2 and ds["n_documents"] == 6
    ids = set(DocumentStore(ds["workspace"]["path"] and _ws(ds)).keys())
    outside = [r for r in RECORDS[2:] if r["documents"][0] not in {x["documents"][0] for x in RECORDS[:2]}]
    assert outside and all(doc_id(r["documents"][0]) in ids for r in outside)
    assert "x1" in ids
    assert ds["workspace"]["reused"] is False and ds["stages"][0]["bank"]["built"] == 6
    # A second eval on the same data (another --out) opens the same workspace and builds nothing.
    ds2 = run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=2, corpus=[str(extra)],
                        out=str(tmp_path / "again")), engine=engine, embedder=emb)["datasets"][dataset]
    assert ds2["workspace"]["reused"] is True and ds2["workspace"]["path"] == ds["workspace"]["path"]
    assert ds2["stages"][0]["bank"]["built"] == 0
    # The easy pool (questions' own documents only) is another workspace.
    ds3 = run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=2, pool="questions",
                        out=str(tmp_path / "easy")), engine=engine, embedder=emb)["datasets"][dataset]
    assert ds3["n_documents"] == 2 and ds3["workspace"]["path"] != ds["workspace"]["path"]


def _ws(ds):
    from regrad_cli.workspace.config import Workspace

    ws = Workspace.open(ds["workspace"]["path"], create=False)
    ws.use_bank_env = False
    return ws


def test_corpus_of_another_dataset(tmp_path, dataset):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "q", "answers": ["a"], "documents": ["a wholly other passage"]}) + "\n")
    ds = run_eval(_cfg(tmp_path, dataset, systems=["closed-book"], corpus=[f"jsonl:{other}"]), engine=_engine(),
                  embedder=FakeEmbedder())["datasets"][dataset]
    assert ds["n_documents"] == 6


def test_paired_comparisons_and_prose(tmp_path, dataset):
    res = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "closed-book", "regrad+context"]), engine=_engine(),
                   embedder=FakeEmbedder())
    ds = res["datasets"][dataset]
    c = ds["comparisons"]["regrad"]["closed-book"]
    f1 = {n: [r["f1"] for r in _preds(res, dataset, n)] for n in ("regrad", "closed-book")}
    assert c["diff"] == pytest.approx(sum(a - b for a, b in zip(f1["closed-book"], f1["regrad"])) / 6)
    report = (tmp_path / "out" / "report.md").read_text()
    assert significance_sentence("closed-book", "regrad", c) in report
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["datasets"][dataset]["comparisons"]) == \
        {"regrad", "regrad+context"}


def test_significance_sentence_follows_the_interval():
    crosses = {"diff": 0.02, "ci95": [-0.05, 0.09], "p_value": 0.6, "n": 50}
    assert "no significant difference" in significance_sentence("rag+phi", "regrad", crosses)
    above = {"diff": 0.2, "ci95": [0.1, 0.3], "p_value": 0.002, "n": 50}
    assert "significantly higher" in significance_sentence("regrad+context", "regrad", above)
    below = {"diff": -0.2, "ci95": [-0.3, -0.1], "p_value": 0.002, "n": 50}
    assert "significantly lower" in significance_sentence("closed-book", "regrad", below)


def test_fail_under_and_baseline(tmp_path, dataset):
    res = run_eval(_cfg(tmp_path, dataset, systems=["closed-book"], fail_under={"closed-book": 0.99}),
                   engine=_engine(), embedder=FakeEmbedder())
    f1 = res["datasets"][dataset]["systems"]["closed-book"]["f1"]
    assert f1 < 0.99
    msg = fail_under_message(res)
    assert msg and "\n" not in msg and "closed-book F1" in msg and "< 0.990" in msg
    res2 = run_eval(_cfg(tmp_path, dataset, systems=["closed-book"], fail_under={"closed-book": 0.0},
                         baseline=str(tmp_path / "out" / "results.json"), out=str(tmp_path / "out2")),
                    engine=_engine(), embedder=FakeEmbedder())
    assert fail_under_message(res2) is None
    (change,) = res2["baseline"]["changes"]
    assert change["f1_before"] == f1 and change["delta"] == pytest.approx(0.0)


def test_demo_dataset_is_the_bundled_corpus():
    items = load_dataset("demo")
    assert len(items) == 108
    corpus = {p.read_text(encoding="utf-8") for p in (DEMO_DIR / "corpus").glob("*.md")}
    assert {d for it in items for d in it.documents} == corpus


def test_cli_fail_under_exit_codes(tmp_path, capsys, monkeypatch):
    from reliability_helpers import run_cli

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:3]))
    common = ["eval", "--dataset", f"jsonl:{data}", "--systems", "closed-book,regrad", "--model", "fake:llama",
              "--embedder", "fake:hash-32", "--max-new-tokens", "3", "--cache", tmp_path / "cache",
              "--drift-steps", "1"]
    code, out, err = run_cli(common + ["--out", tmp_path / "a", "--fail-under", "regrad=0.99"], capsys, monkeypatch)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: --fail-under: regrad F1") and "< 0.990" in last
    assert sum(line.startswith("Error") for line in err.splitlines()) == 1
    assert (tmp_path / "a" / "results.json").exists()  # the run is kept
    code, out, err = run_cli(common + ["--out", tmp_path / "b", "--fail-under", "regrad=0",
                                       "--baseline", tmp_path / "a" / "results.json"], capsys, monkeypatch)
    assert code == 0, err
    assert "change against" in out and "regrad: F1" in out
    code, out, err = run_cli(common + ["--out", tmp_path / "c", "--fail-under", "oracle=0.5"], capsys, monkeypatch)
    assert code == 1 and "--systems does not run" in err


def _strip(recs):
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in recs]


def test_resume_keeps_answered_systems_and_runs_only_the_rest(tmp_path, dataset, monkeypatch):
    from regrad_cli.learning.evaluation import systems as sysmod

    engine, emb = _engine(), FakeEmbedder()
    first = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "cpt"], limit=4), engine=engine, embedder=emb)
    ran = []
    real = sysmod.run_system

    def spy(qe, name, *a, **kw):
        ran.append(name)
        return real(qe, name, *a, **kw)

    monkeypatch.setattr("regrad_cli.learning.evaluation.harness.run_system", spy)
    second = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "rag+phi", "cpt"], limit=4, resume=True),
                      engine=engine, embedder=emb)
    assert ran == ["rag+phi"]  # regrad and cpt (its drift recorded) are kept, CPT is not trained again
    ds1, ds2 = first["datasets"][dataset], second["datasets"][dataset]
    assert ds2["kept"]["systems"] == ["cpt", "regrad"]
    # CPT was not trained again; the summary is the first run's training.
    assert ds2["cpt"]["kept"] is True and ds2["cpt"]["rounds"] == ds1["cpt"]["rounds"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Answers kept from an earlier run" in report and "cpt, regrad" in report
    for name in ("regrad", "cpt"):
        assert ds2["systems"][name]["f1"] == ds1["systems"][name]["f1"]
        assert ds2["systems"][name]["drift"]["ppl_deployed"] == ds1["systems"][name]["drift"]["ppl_deployed"]
    assert _strip(_preds(second, dataset, "regrad")) == _strip(_preds(first, dataset, "regrad"))
    # The file holds every system's answers exactly once, and the comparisons cover all three.
    preds = [json.loads(x) for x in open(ds2["predictions"])]
    assert sorted({(r["system"]) for r in preds}) == ["cpt", "rag+phi", "regrad"] and len(preds) == 12
    assert set(ds2["comparisons"]["regrad"]) == {"rag+phi", "cpt"}
    # A third resume with nothing new runs nothing and gives the same figures.
    ran.clear()
    third = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "rag+phi", "cpt"], limit=4, resume=True),
                     engine=engine, embedder=emb)
    assert ran == []
    assert third["datasets"][dataset]["comparisons"] == ds2["comparisons"]


def test_resume_reruns_a_system_cut_short_and_refuses_other_options(tmp_path, dataset):
    from regrad_cli.errors import ConfigError

    engine, emb = _engine(), FakeEmbedder()
    first = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "rag"], limit=4), engine=engine, embedder=emb)
    path = first["datasets"][dataset]["predictions"]
    lines = open(path).read().splitlines()
    # Killed in the middle of rag's answers: two of its four lines and a torn third.
    with open(path, "w") as fh:
        fh.write("\n".join(lines[:6]) + "\n" + lines[6][:20])
    again = run_eval(_cfg(tmp_path, dataset, systems=["regrad", "rag"], limit=4, resume=True), engine=engine,
                     embedder=emb)
    ds = again["datasets"][dataset]
    assert ds["kept"]["systems"] == ["regrad"]
    preds = [json.loads(x) for x in open(path)]
    assert [r["system"] for r in preds].count("rag") == 4
    assert _strip(_preds(again, dataset, "rag")) == _strip(_preds(first, dataset, "rag"))
    # Another top-k (or another question set) is another run: refused, and nothing is deleted.
    before = open(path).read()
    with pytest.raises(ConfigError, match="top-k"):
        run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=4, top_k=1, resume=True), engine=engine,
                 embedder=emb)
    with pytest.raises(ConfigError, match="questions"):
        run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=3, resume=True), engine=engine, embedder=emb)
    assert open(path).read() == before


def test_resume_accepts_a_run_from_before_run_keys(tmp_path, dataset):
    engine, emb = _engine(), FakeEmbedder()
    first = run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=3), engine=engine, embedder=emb)
    ddir = tmp_path / "out" / first["datasets"][dataset]["slug"]
    (ddir / "run-key.json").unlink()
    (ddir / "systems.jsonl").unlink()
    # The key then comes from results.json; regrad's drift is measured again (same weights).
    again = run_eval(_cfg(tmp_path, dataset, systems=["regrad"], limit=3, resume=True), engine=engine, embedder=emb)
    ds = again["datasets"][dataset]
    assert ds["kept"] == {"systems": ["regrad"], "key": str(tmp_path / "out" / "results.json")}
    assert ds["systems"]["regrad"]["drift"]["ppl_deployed"] == pytest.approx(
        first["datasets"][dataset]["systems"]["regrad"]["drift"]["ppl_deployed"], rel=1e-6)
