"""What `fastrank train` and `save_trained` write: OUT must be absent, empty, or a training run / trained model
fastrank wrote (recognised by its manifest), checked before any model loads; a model saved again replaces
only the files its manifest owns; a user's own files in OUT are refused or left alone, never overwritten.
`fastrank train` refuses option combinations it would silently ignore, naming both options. And the other
writers of outputs: atomic_output replaces files only, and a run file written over one of the command's
own inputs is refused."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faiss")
pytest.importorskip("ir_measures")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir  # noqa: E402
from fastrank.index.storage import meta_checksum  # noqa: E402
from fastrank.train import train  # noqa: E402
from fastrank.trained import MANIFEST, load_trained, save_trained  # noqa: E402
from tiny_bert import beir_training_folder, small_train_config  # noqa: E402

SCIFACT = Path(__file__).parent / "data" / "scifact-slice"
RUN_MANIFEST = "fastrank_run.json"


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    """A BEIR training folder over the SciFact slice (40 queries, each a few words of its positive) and a
    tiny BERT over its texts."""
    return beir_training_folder(tmp_path_factory.mktemp("beir"), load_beir(SCIFACT).corpus)


@pytest.fixture(scope="module")
def tiny(beir):
    from transformers import AutoModel, AutoTokenizer

    _, model = beir
    return AutoModel.from_pretrained(model), AutoTokenizer.from_pretrained(model), model


def _save(tiny, out, projection=None):
    model, tokenizer, base = tiny
    projection = torch.randn(4, 32) if projection is None else projection
    return save_trained(out, scorer="maxsim", model=model, tokenizer=tokenizer, head_state={"projection": projection},
                        pooling="mean", query_max_length=32, doc_max_length=200, base_model=base, training={})


def _listing(path: Path) -> dict:
    """Every file under ``path`` with the sha256 of its bytes."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _cfg(beir, out, **kw):
    return small_train_config(beir, out, **kw)


# -- save_trained ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("own", [
    {"notes.txt": "my notes"},  # a directory of the user's
    {"head.pt": "my head"},  # before: overwritten
    {"fastrank_model.json": "{}"},  # a manifest that is not fastrank's
    {"encoder/config.json": "{\"mine\": 1}"},  # before: save_pretrained wrote over it
])
def test_save_trained_refuses_a_directory_it_did_not_write(tiny, tmp_path, own):
    out = tmp_path / "out"
    for name, text in own.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _listing(out)
    with pytest.raises(ValueError, match=rf"^out {out}: the directory holds .*refusing to write into it"):
        _save(tiny, out)
    assert _listing(out) == before and sorted(p.name for p in out.iterdir()) == sorted({n.split("/")[0] for n in own})


def test_save_trained_empty_path_is_an_error(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before: the model was written into the working directory
    with pytest.raises(ValueError, match="^out is empty; name the directory"):
        _save(tiny, "")
    assert list(tmp_path.iterdir()) == []


def test_save_trained_again_replaces_only_what_its_manifest_owns(tiny, tmp_path):
    out = _save(tiny, tmp_path / "m")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"] == "fastrank" and set(manifest["files"]) == set(_listing(out)) - {MANIFEST}
    # An older model with one more encoder file (weights saved under another name): the manifest owns it.
    (out / "encoder" / "pytorch_model.bin").write_bytes(b"old weights")
    manifest["files"]["encoder/pytorch_model.bin"] = hashlib.sha256(b"old weights").hexdigest()
    manifest["meta_sha256"] = meta_checksum(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "notes.txt").write_text("beside the model: mine")
    projection = torch.randn(4, 32)
    _save(tiny, out, projection)
    assert not (out / "encoder" / "pytorch_model.bin").exists()  # before: left behind, a mix of two models
    assert (out / "notes.txt").read_text() == "beside the model: mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(["encoder", "head.pt", MANIFEST, "notes.txt"])
    assert torch.equal(load_trained(out).projection, projection)


def test_save_trained_refuses_a_user_file_inside_the_models_encoder(tiny, tmp_path):
    out = _save(tiny, tmp_path / "m")
    (out / "encoder" / "README.md").write_text("my model card")
    before = _listing(out)
    with pytest.raises(ValueError, match=rf"^out {out}: encoder is not fastrank's"):
        _save(tiny, out)
    assert _listing(out) == before


def test_save_trained_refuses_an_edited_manifest_claiming_a_users_file(tiny, tmp_path):
    out = _save(tiny, tmp_path / "m")
    (out / "encoder" / "README.md").write_text("my model card")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["encoder/README.md"] = "0" * 64  # listed, but the manifest's checksum no longer holds
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="a manifest fastrank cannot trust"):
        _save(tiny, out)
    assert (out / "encoder" / "README.md").read_text() == "my model card"


def test_a_failed_save_leaves_the_old_model_and_nothing_partial(tiny, tmp_path):
    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "config.json").write_text("{}")
            raise OSError("disk full")

    out = _save(tiny, tmp_path / "m")
    before = _listing(out)
    for target in (out, tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            save_trained(target, scorer="maxsim", model=Broken(), tokenizer=tiny[1], head_state={}, pooling="mean",
                         query_max_length=32, doc_max_length=200, base_model="x", training={})
    assert _listing(out) == before and not (tmp_path / "new").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["encoder", "head.pt", MANIFEST])


def test_a_model_saved_before_manifests_listed_files_is_still_replaced(tiny, tmp_path):
    out = _save(tiny, tmp_path / "m")
    manifest = json.loads((out / MANIFEST).read_text())
    for key in ("written_by", "files", "meta_sha256"):
        del manifest[key]
    (out / MANIFEST).write_text(json.dumps(manifest))
    projection = torch.randn(4, 32)
    _save(tiny, out, projection)
    assert torch.equal(load_trained(out).projection, projection)
    assert json.loads((out / MANIFEST).read_text())["written_by"] == "fastrank"


# -- fastrank train's OUT --------------------------------------------------------------------------------
@pytest.mark.parametrize("own", ["notes.txt", "head.pt", "fastrank_model.json", "encoder/config.json",
                                 "checkpoint.pt"])
def test_train_refuses_an_out_it_did_not_write_before_any_model_loads(beir, tmp_path, capsys, monkeypatch, own):
    from fastrank import encoders

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before OUT was checked")

    monkeypatch.setattr(encoders.Encoder, "__init__", no_model)
    root, model = beir
    out = tmp_path / "out"
    (out / own).parent.mkdir(parents=True, exist_ok=True)
    (out / own).write_text("mine")
    before = _listing(out)
    # before: notes.txt, head.pt and encoder/ passed the check (and the run wrote over them at the end)
    rc = main(["train", str(root), str(out), "--model", model, "--scorer", "maxsim", "--device", "cpu",
               "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"fastrank train: error: out {out}: the directory holds "), err
    assert _listing(out) == before and not (tmp_path / "cache").exists()


def test_train_empty_out_is_an_error(beir):
    with pytest.raises(ValueError, match="^out is empty"):
        _cfg(beir, "").check()


def test_a_run_is_recognised_from_its_first_write_and_resumes(beir, tmp_path):
    out = tmp_path / "run"
    # A run stopped before its first checkpoint (say while encoding) holds only its manifest and cache: a
    # plain rerun continues into it.
    from fastrank.trained import write_run_manifest

    write_run_manifest(out, ("checkpoint.pt", "checkpoint.pt.tmp", "cache"))
    (out / "cache").mkdir()
    _cfg(beir, out, cache_dir=None).check()

    part = train(_cfg(beir, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=4, eval_every=2, keep="last"),
                 stop_after=2)
    assert not part.finished and (tmp_path / "b" / RUN_MANIFEST).is_file()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a training run"):
        _cfg(beir, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=4).check()
    done = train(_cfg(beir, tmp_path / "b", scorer="maxsim", proj_dim=8, steps=4, eval_every=2, keep="last",
                      resume=True))
    assert done.finished and done.steps == 4
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert load_trained(tmp_path / "b").projection.shape == (8, 32)


def test_resume_of_a_run_started_before_run_manifests(beir, tmp_path):
    """--resume vouches for a checkpoint.pt in an OUT without fastrank_run.json (a run an older fastrank
    began); without --resume the same directory is not recognised."""
    out = tmp_path / "old"
    train(_cfg(beir, out, scorer="maxsim", proj_dim=8, steps=4, eval_every=2, keep="last"), stop_after=2)
    (out / RUN_MANIFEST).unlink()
    with pytest.raises(ValueError, match="files and no trained fastrank model or training run"):
        _cfg(beir, out, scorer="maxsim", proj_dim=8, steps=4).check()
    done = train(_cfg(beir, out, scorer="maxsim", proj_dim=8, steps=4, eval_every=2, keep="last", resume=True))
    assert done.finished and (out / RUN_MANIFEST).is_file() and load_trained(out).scorer == "maxsim"


# -- option combinations train would ignore ---------------------------------------------------------------
@pytest.fixture
def teacher_file(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("1\t0\tq1\ta\tb\n")
    return str(path)


@pytest.mark.parametrize("kw, message", [
    (dict(scorer="maxsim", tau=0.5, loss=("margin_mse",), self_distill=True),
     "tau 0.5 with loss margin_mse: none of these losses has a temperature"),
    (dict(scorer="maxsim", tau=0.5, loss=("mse", "rankdistil_b"), self_distill=True),
     "tau 0.5 with loss mse+rankdistil_b"),
    (dict(scorer="maxsim", gamma0=0.3, loss=("ce",)), "gamma0 0.3 with loss ce: gamma0 is rankdistil_b's"),
    (dict(scorer="maxsim", lite_row_hidden=16), "lite_row_hidden 16 with scorer maxsim"),
    (dict(scorer="dense", freeze_encoder=False, lite_col_hidden=8), "lite_col_hidden 8 with scorer dense"),
    (dict(scorer="lite", self_distill=True, loss=("ce",)), "self_distill with loss ce: no loss of these reads"),
    (dict(scorer="maxsim", teacher="TEACHER", loss=("ce", "inbatch_ce")), "teacher with loss ce+inbatch_ce"),
    (dict(scorer="maxsim", teacher_model="MODEL", loss=("ce",)), "teacher_model with loss ce"),
    (dict(scorer="maxsim", keep="best", dev_queries=0), "keep best with dev_queries 0"),
])
def test_ignored_combinations_are_refused_naming_both(beir, tmp_path, teacher_file, kw, message):
    _, model = beir
    kw = {k: teacher_file if v == "TEACHER" else model if v == "MODEL" else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        _cfg(beir, tmp_path / "out", **kw).check()
    assert not (tmp_path / "out").exists()


def test_the_same_options_where_they_are_read_still_pass(beir, tmp_path, teacher_file):
    ok = [dict(scorer="maxsim", tau=0.5, loss=("ce",)), dict(scorer="maxsim", tau=0.5, loss=("margin_mse", "kl_div"),
                                                              teacher=teacher_file),
          dict(scorer="maxsim", gamma0=0.3, loss=("rankdistil_b",), teacher=teacher_file),
          dict(scorer="lite", lite_row_hidden=16), dict(scorer="maxsim", keep="best")]
    for kw in ok:
        _cfg(beir, tmp_path / "out", **kw).check()
    # Defaults that would be ignored now follow the options given, rather than being refused.
    assert not _cfg(beir, tmp_path / "out", scorer="lite", loss=("ce",)).check().self_distill
    assert _cfg(beir, tmp_path / "out", scorer="maxsim", dev_queries=0).check().keep == "last"
    assert _cfg(beir, tmp_path / "out", scorer="maxsim").check().keep == "best"


def test_check_twice_refuses_nothing_the_first_accepted(beir, tmp_path, teacher_file):
    """train() checks the config again: defaults the first check filled in are not options the user gave."""
    for kw in (dict(scorer="maxsim", teacher=teacher_file), dict(scorer="lite"), dict(scorer="lite", loss=("ce",)),
               dict(scorer="maxsim", dev_queries=0), dict(scorer="dense", freeze_encoder=False)):
        once = _cfg(beir, tmp_path / "out", **kw).check()
        assert once.check().to_json() == once.to_json()
    assert _cfg(beir, tmp_path / "out", scorer="maxsim", teacher=teacher_file).check().tau is None


def test_cli_names_the_options_before_any_model_loads(beir, tmp_path, capsys, teacher_file):
    root, model = beir
    rc = main(["train", str(root), str(tmp_path / "out"), "--model", model, "--scorer", "maxsim", "--loss", "ce",
               "--gamma0", "0.2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fastrank train: error: gamma0 0.2 with loss ce") and "rankdistil_b" in err
    assert not (tmp_path / "out").exists()


# -- the other outputs ------------------------------------------------------------------------------------
def test_atomic_output_never_replaces_a_directory(tmp_path):
    from fastrank.data import atomic_output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(TypeError):  # before: directory=True swapped `mine` aside and rmtree'd it
        with atomic_output(mine, directory=True):
            pass
    with pytest.raises(ValueError, match="is a directory; expected the path of a file"):
        with atomic_output(mine):
            pass
    assert (mine / "notes.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_a_run_is_never_written_over_an_input_of_the_command(beir, tmp_path, capsys):
    root, model = beir
    corpus = [json.loads(line)["_id"] for line in (root / "corpus.jsonl").read_text().splitlines()]
    run = tmp_path / "run.tsv"
    run.write_text("".join(f"q1\t{d}\t{i + 1}\t{10 - i}\n" for i, d in enumerate(corpus[:5])))
    before = run.read_bytes()
    # before: the re-ranked run replaced the candidates it was read from
    rc = main(["rerank", str(run), str(root / "queries.jsonl"), str(root / "corpus.jsonl"), str(run), "--model", model,
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"fastrank rerank: error: OUT {run}: is RUN {run}, which this command reads")
    assert run.read_bytes() == before

    ix = tmp_path / "ix"
    assert main(["index", str(root / "corpus.jsonl"), str(ix), "--model", model, "--device", "cpu"]) == 0
    capsys.readouterr()
    listing = _listing(ix)
    # before: the run replaced the index's meta.json, and the index no longer loaded
    rc = main(["retrieve", str(ix), str(root / "queries.jsonl"), str(ix / "meta.json"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"fastrank retrieve: error: OUT {ix / 'meta.json'}: is INDEX {ix} (a file in it)")
    assert _listing(ix) == listing
    out = tmp_path / "run.txt"
    assert main(["retrieve", str(ix), str(root / "queries.jsonl"), str(out), "--device", "cpu", "-k", "3"]) == 0
    assert len(out.read_text().splitlines()) == 3 * 40
