"""Index directories never lose what fastrank did not write, meta.json is a checked manifest, and NaN never
enters or queries an index (issue 22)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from fastrank.cli import main  # noqa: E402
from fastrank.data import load_beir  # noqa: E402
from fastrank.index import DenseIndex, IndexFormatError, TokenIndex  # noqa: E402
from fastrank.index import storage  # noqa: E402

DIM = 16
rng = np.random.default_rng(7)
X = rng.standard_normal((300, DIM)).astype(np.float32)
Q = rng.standard_normal((5, DIM)).astype(np.float32)
g = torch.Generator().manual_seed(7)
LENGTHS = [int(n) for n in torch.randint(1, 9, (40,), generator=g)]
T_VEC = torch.nn.functional.normalize(torch.randn(sum(LENGTHS), DIM, generator=g), dim=1)
T_OFF = torch.tensor([0, *np.cumsum(LENGTHS)], dtype=torch.int64)


def _dense(kind="flat", **kw):
    return DenseIndex(DIM, kind, nlist=4, **kw).add(X, [f"d{i}" for i in range(len(X))], progress=False)


def _tokens(**kw):
    return TokenIndex(DIM, ncentroids=8, **kw).add((T_VEC, T_OFF), progress=False)


def _snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _edit_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


# -- defect: save writes into any directory ----------------------------------------------------------------
@pytest.mark.parametrize("make", [_dense, _tokens], ids=["dense", "tokens"])
def test_save_refuses_a_directory_that_is_not_a_fastrank_index_and_touches_nothing(tmp_path, make):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "meta.json").write_text("{}")
    (user / "ids.json").write_text('["my", "own"]')
    (user / "notes.txt").write_text("keep me\n")
    before = _snapshot(user)
    with pytest.raises(ValueError, match=r"mine: the directory holds a meta.json that is not a fastrank index"):
        make().save(user)
    assert _snapshot(user) == before
    (user / "meta.json").unlink()  # files and no manifest at all
    with pytest.raises(ValueError, match=r"holds files and no fastrank index"):
        make().save(user)
    assert _snapshot(user) == {k: v for k, v in before.items() if k != "meta.json"}


def test_save_over_an_index_keeps_the_users_files_and_refuses_to_overwrite_one(tmp_path):
    ix = tmp_path / "ix"
    _dense().save(ix)
    (ix / "notes.txt").write_text("keep me\n")
    _dense("hnsw").save(ix)  # replaces the index, not the notes
    assert (ix / "notes.txt").read_text() == "keep me\n" and DenseIndex.load(ix).kind == "hnsw"
    (ix / "tokens.npy").write_bytes(b"the user's own file")
    before = _snapshot(ix)
    with pytest.raises(ValueError, match=r"tokens.npy is not a file of the index saved there; refusing to overwrite"):
        _tokens().save(ix, progress=False)
    assert _snapshot(ix) == before and DenseIndex.load(ix).kind == "hnsw"


def test_a_token_index_saved_over_a_dense_one_removes_the_dense_files_only(tmp_path):
    ix = tmp_path / "ix"
    _dense().save(ix, attach={"encoder.json": "{}"})
    (ix / "notes.txt").write_text("keep me\n")
    _tokens().save(ix, progress=False)
    assert sorted(p.name for p in ix.iterdir()) == sorted(["notes.txt", "meta.json", *_tokens().saved_files()])
    assert len(TokenIndex.load(ix)) == len(LENGTHS)
    _dense(backend="torch").save(ix)  # and back: the token files go
    assert sorted(p.name for p in ix.iterdir()) == ["ids.json", "meta.json", "notes.txt", "vectors.npy"]
    assert len(DenseIndex.load(ix)) == len(X)


@pytest.mark.parametrize("make", [_dense, _tokens], ids=["dense", "tokens"])
def test_save_to_an_empty_path_is_an_error(tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="path is empty"):
        make().save("")
    assert list(tmp_path.iterdir()) == []


def test_attach_may_not_replace_an_index_file(tmp_path):
    with pytest.raises(ValueError, match="attach: 'ids.json'"):
        _dense().save(tmp_path / "ix", attach={"ids.json": "[]"})
    assert not (tmp_path / "ix").exists()


def test_a_failed_save_leaves_the_old_index_whole_and_no_temporary_files(tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    _dense().save(ix)
    before = _snapshot(ix)

    def crash(meta):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "meta_checksum", crash)  # every new file written, none renamed into place
    with pytest.raises(OSError, match="disk full"):
        _dense("hnsw").save(ix)
    with pytest.raises(OSError, match="disk full"):
        _dense().save(tmp_path / "new")
    monkeypatch.undo()
    assert _snapshot(ix) == before and sorted(os.listdir(ix)) == sorted(before)
    assert DenseIndex.load(ix).kind == "flat"
    assert not (tmp_path / "new").exists()


def test_a_save_cut_off_before_meta_json_is_published_never_loads_as_a_mix(tmp_path, monkeypatch):
    ix = tmp_path / "ix"
    _dense().save(ix)
    replace = os.replace

    def cut_off_at_meta(src, dst):
        if Path(dst).name == "meta.json":
            raise OSError("power lost")
        replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", cut_off_at_meta)
    with pytest.raises(OSError, match="power lost"):
        _dense("hnsw").save(ix)
    with pytest.raises(OSError, match="power lost"):
        _dense().save(tmp_path / "new")  # where no index was, what the save renamed into place goes again
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()
    assert not [n for n in os.listdir(ix) if ".partial-" in n]
    with pytest.raises(IndexFormatError, match="index.faiss: checksum does not match"):
        DenseIndex.load(ix)  # the old meta.json with the new index.faiss: refused, not searched
    _dense("hnsw").save(ix)  # the old manifest still owns the directory: a rerun replaces it
    assert DenseIndex.load(ix).kind == "hnsw"


def test_leftovers_of_a_crashed_save_do_not_block_the_next_one(tmp_path):
    ix = tmp_path / "ix"
    ix.mkdir()
    (ix / ".index.faiss.partial-999999-0123abcd").write_bytes(b"half")
    _dense().save(ix)
    assert len(DenseIndex.load(ix)) == len(X)


# -- defect: meta.json is neither checksummed nor validated --------------------------------------------
DENSE_EDITS = {  # kind the index is built with, the edit, what the error names
    "metric": ("flat", lambda m: m.update(metric="l2"), "field metric is 'l2', but index.faiss holds 'ip'"),
    "ef_search": ("hnsw", lambda m: m["params"].update(ef_search=-5), "field params.ef_search must be a positive"),
    "kind": ("hnsw", lambda m: m.update(kind="flat"), "field kind is 'flat', but index.faiss holds 'hnsw'"),
    "dim_type": ("flat", lambda m: m.update(dim="16"), "field dim must be a positive integer"),
    "params_type": ("flat", lambda m: m.update(params=[]), "field params must be an object"),
    "nprobe_missing": ("ivf_flat", lambda m: m["params"].pop("nprobe"), "field params.nprobe must be"),
    "seed_type": ("flat", lambda m: m["params"].update(seed=[1]), "field params.seed must be an integer"),
    "nlist": ("ivf_flat", lambda m: m["params"].update(nlist=5), "field params.nlist is 5, but index.faiss holds 4"),
    "ntotal_type": ("flat", lambda m: m.update(ntotal=None), "field ntotal must be a positive integer"),
    "id_type": ("flat", lambda m: m.update(id_type="int"), "ids do not match meta.json's id_type 'int'"),
    "data_file": ("flat", lambda m: m.update(data_file="../elsewhere"), "field data_file must be one of"),
    # A valid value that the FAISS file cannot contradict is caught by meta.json's own checksum.
    "ef_search_valid": ("hnsw", lambda m: m["params"].update(ef_search=7), "do not match its meta_sha256"),
    "nprobe_valid": ("ivf_flat", lambda m: m["params"].update(nprobe=1), "do not match its meta_sha256"),
}


@pytest.mark.parametrize("case", list(DENSE_EDITS))
def test_an_edited_dense_meta_json_is_an_error_naming_the_field(tmp_path, case):
    kind, edit, message = DENSE_EDITS[case]
    _dense(kind).save(tmp_path / "ix")
    _edit_meta(tmp_path / "ix", edit)
    with pytest.raises(IndexFormatError, match=message):
        DenseIndex.load(tmp_path / "ix")


TOKEN_EDITS = {
    "nprobe": (lambda m: m.update(nprobe=-1), "field nprobe must be a positive integer"),
    "seed": (lambda m: m.update(seed=[1]), "field seed must be an integer"),
    "stage1": (lambda m: m.update(stage1="exhaustive"), "field ncentroids must be null for stage1 'exhaustive'"),
    "token_dtype": (lambda m: m.update(token_dtype="float32"), "field token_dtype must be one of"),
    "token_dtype_type": (lambda m: m.update(token_dtype=["int8"]), "field token_dtype must be one of"),
    "ndocs": (lambda m: m.update(ndocs="many"), "field ndocs must be null or a positive integer"),
    "nprobe_valid": (lambda m: m.update(nprobe=3), "do not match its meta_sha256"),
}


@pytest.mark.parametrize("case", list(TOKEN_EDITS))
def test_an_edited_token_meta_json_is_an_error_naming_the_field(tmp_path, case):
    edit, message = TOKEN_EDITS[case]
    _tokens().save(tmp_path / "tix", progress=False)
    _edit_meta(tmp_path / "tix", edit)
    with pytest.raises(IndexFormatError, match=message):
        TokenIndex.load(tmp_path / "tix")


def test_meta_json_is_a_manifest_naming_fastrank_its_version_and_files(tmp_path):
    _tokens().save(tmp_path / "tix", progress=False, attach={"encoder.json": "{}"})
    meta = json.loads((tmp_path / "tix" / "meta.json").read_text())
    assert meta["written_by"] == "fastrank" and meta["format"] == "fastrank.TokenIndex" and meta["version"] == 3
    assert sorted(meta["sha256"]) == sorted([*_tokens().saved_files(), "encoder.json"])
    assert meta["meta_sha256"] == storage.meta_checksum(meta)
    # Reformatting keeps the checksum: it is over the canonical JSON of the fields.
    (tmp_path / "tix" / "meta.json").write_text(json.dumps(meta, indent=4, sort_keys=True))
    assert len(TokenIndex.load(tmp_path / "tix")) == len(LENGTHS)


def test_an_index_saved_before_manifests_still_loads_and_is_validated(tmp_path):
    ix = tmp_path / "ix"
    _dense("hnsw").save(ix)

    def to_version_1(meta):
        for key in ("written_by", "meta_sha256"):
            meta.pop(key)
        meta["version"] = 1

    _edit_meta(ix, to_version_1)
    assert DenseIndex.load(ix).kind == "hnsw"
    _edit_meta(ix, lambda m: m.update(kind="flat"))
    with pytest.raises(IndexFormatError, match="field kind is 'flat'"):
        DenseIndex.load(ix)
    _edit_meta(ix, lambda m: m.update(kind="hnsw"))
    (ix / "notes.txt").write_text("keep me\n")
    _dense().save(ix)  # an old index is replaced like a new one
    assert DenseIndex.load(ix).kind == "flat" and (ix / "notes.txt").is_file()


def test_a_manifest_whose_checksum_fails_is_not_trusted_to_name_files_to_remove(tmp_path):
    ix = tmp_path / "ix"
    _dense().save(ix)
    (ix / "notes.txt").write_text("keep me\n")
    _edit_meta(ix, lambda m: m["sha256"].update({"notes.txt": "0" * 64}))
    with pytest.raises(ValueError, match="not a fastrank index manifest"):
        _tokens().save(ix, progress=False)
    assert (ix / "notes.txt").read_text() == "keep me\n"


# -- defect: NaN vectors and queries ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dense_add_refuses_non_finite_vectors_naming_the_row(backend, bad):
    x = X.copy()
    x[3, 5] = bad
    index = DenseIndex(DIM, backend=backend)
    with pytest.raises(ValueError, match=r"vectors: row 3 holds NaN or inf"):
        index.add(x, progress=False)
    with pytest.raises(ValueError, match=r"vectors: row 3 holds NaN or inf"):
        index.add(torch.from_numpy(x), progress=False)
    assert len(index) == 0


@pytest.mark.parametrize("kind, backend", [("flat", "faiss"), ("hnsw", "faiss"), ("flat", "torch")])
def test_dense_search_refuses_non_finite_queries_naming_the_row(kind, backend):
    index = DenseIndex(DIM, kind, backend=backend).add(X, progress=False)
    q = Q.copy()
    q[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"queries: row 2 holds NaN or inf"):
        index.search(q, 3, progress=False)
    q[2, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"queries: row 2 holds NaN or inf"):
        index.search(torch.from_numpy(q), 3, progress=False)


def test_token_index_refuses_non_finite_queries_and_documents_naming_the_row():
    index = _tokens()
    qv, qo = T_VEC[:7].clone(), torch.tensor([0, 3, 7])
    qv[4, 1] = float("nan")
    for exhaustive in (True, False):
        with pytest.raises(ValueError, match=r"queries: query 1 \(token row 4\) holds NaN or inf"):
            index.search((qv, qo), 3, exhaustive=exhaustive, progress=False)
    docs = T_VEC.clone()
    docs[int(T_OFF[5]), 0] = float("inf")
    with pytest.raises(ValueError, match=rf"tokens: document 5 \(token row {int(T_OFF[5])}\) holds NaN or inf"):
        TokenIndex(DIM).add((docs, T_OFF), progress=False)


# -- defect: `fastrank index CORPUS OUT` deleted everything in OUT that held a meta.json ------------------
SCIFACT = Path(__file__).parent / "data" / "scifact-slice"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_bert import make_tiny_bert

    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), list(load_beir(SCIFACT).corpus.values())))


def _index(capsys, corpus, out, model, *extra):
    rc = main(["index", str(corpus), str(out), "--model", model, "--device", "cpu", *extra])
    return rc, capsys.readouterr().err


def test_index_command_refuses_a_directory_with_a_foreign_meta_json_and_its_own_input(tmp_path, tiny_model, capsys,
                                                                                     monkeypatch):
    from fastrank import encoders

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder loaded before OUT was checked")

    monkeypatch.setattr(encoders.Encoder, "__init__", refuse)
    out = tmp_path / "project"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    (out / "notes.txt").write_text("keep me\n")
    shutil.copy(SCIFACT / "corpus.jsonl", out / "corpus.jsonl")
    before = _snapshot(out)
    rc, err = _index(capsys, out / "corpus.jsonl", out, tiny_model)
    assert rc == 2 and "CORPUS" in err and "inside OUT" in err, err
    rc, err = _index(capsys, SCIFACT / "corpus.jsonl", out, tiny_model)
    assert rc == 2 and "OUT" in err and "not a fastrank index manifest" in err, err
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)


def test_index_command_replaces_an_index_and_keeps_the_users_files(tmp_path, tiny_model, capsys):
    out = tmp_path / "ix"
    assert _index(capsys, SCIFACT / "corpus.jsonl", out, tiny_model)[0] == 0
    (out / "notes.txt").write_text("keep me\n")
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(SCIFACT / "corpus.jsonl", corpus)
    rc, err = _index(capsys, corpus, out, tiny_model, "--tokens", "--exhaustive")
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "keep me\n" and not (out / "index.faiss").exists()
    assert len(TokenIndex.load(out)) == len(load_beir(SCIFACT).corpus)
    # The corpus inside an index directory is refused before any work, and nothing there changes.
    shutil.copy(corpus, out / "corpus.jsonl")
    before = _snapshot(out)
    rc, err = _index(capsys, out / "corpus.jsonl", out, tiny_model)
    assert rc == 2 and "inside OUT" in err and _snapshot(out) == before
