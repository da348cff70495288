"""Sharded token indexes: one streamed shard per process of a distributed build, one manifest over them, and
a search that merges the shards' top-k.

``torchrun --nproc_per_node N -m fastrank.cli index CORPUS OUT --tokens`` (on one machine or several sharing
a filesystem) builds ``OUT/shard-<rank>/`` on each rank from every N-th chunk of the corpus. Stage 1 is
trained once, by rank 0 on the first chunks of the corpus (the same sample a single-process build trains on),
written to ``OUT/stage1/`` and used by every shard; rank 0 publishes ``OUT/meta.json`` when every shard is
complete. Every shard records the build's id, so a shard copied in from another index is refused by name.

A search runs each shard's search and keeps the best ``k`` of their results. Exact scores do not depend on
the shard, so an exhaustive search returns what a single index of the same corpus returns. With centroid
candidates each shard keeps its own ``ndocs`` best, a superset of the single index's candidates: the merged
top-k is the single index's, or better by exact MaxSim.

Serving a corpus larger than one machine: give each machine a few shards (``TokenIndex`` loads a shard on
its own), search them there, and merge the per-machine top-k the way :meth:`ShardedTokenIndex.search` merges
shards: every returned score is an exact MaxSim, comparable across machines.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from fastrank.index.storage import (META, WRITER, IndexFormatError, check_index_dir, fsync_path, meta_checksum,
                                    partial_name, read_meta, sha256_file, verify_files, verify_meta_checksum)
from fastrank.index.tokens import FORMAT as TOKEN_FORMAT
from fastrank.index.tokens import TokenIndex, as_token_embeddings

FORMAT = "fastrank.ShardedTokenIndex"
VERSION = 1
STAGE1_DIR = "stage1"


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}"


def _publish(path: Path, meta: dict) -> None:
    meta = dict(meta, written_by=WRITER)
    meta.pop("meta_sha256", None)
    meta["meta_sha256"] = meta_checksum(meta)
    tmp = partial_name(path, META)
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path / META)
    fsync_path(path, directory=True)


def begin(out: Path, world_size: int, header: dict, attach: dict[str, str], label: str = "OUT") -> dict:
    """Rank 0: the manifest of a sharded build in ``out``, new (state ``building``, a fresh build id) or that of
    a partial build of the same options and world size (resumed). Other ranks read it with :func:`read_building`."""
    header = dict(header, world_size=world_size)
    meta_file = out / META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError:
            meta = None
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            if meta.get("meta_sha256") != meta_checksum(meta):
                raise IndexFormatError(f"{meta_file}: does not match its checksum; delete {out} and build again")
            if meta.get("state") == "complete":
                raise FileExistsError(f"{label} {out}: already holds a complete sharded index; pick another directory")
            old = meta["header"]
            for key in sorted(set(old) | set(header)):
                if old.get(key) != header.get(key):
                    what = "processes" if key == "world_size" else key
                    raise ValueError(f"{label} {out}: holds a partial sharded build made with {what}={old.get(key)!r}; "
                                     f"this run has {what}={header.get(key)!r}. Re-run with the same options and "
                                     "number of processes to resume it, or pick another directory")
            return meta
    names = [STAGE1_DIR, *(shard_name(r) for r in range(world_size)), *attach]
    owned = check_index_dir(out, names, label=label)
    if owned:
        raise FileExistsError(f"{label} {out}: holds an index; a sharded build needs a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / STAGE1_DIR).mkdir(exist_ok=True)
    sums = {}
    for name, text in attach.items():
        tmp = partial_name(out, name)
        tmp.write_text(text, encoding="utf-8")
        fsync_path(tmp)
        os.replace(tmp, out / name)
        sums[name] = sha256_file(out / name)
    meta = {"format": FORMAT, "version": VERSION, "state": "building", "build_id": uuid.uuid4().hex,
            "header": header, "sha256": sums, "dirs": [STAGE1_DIR, *(shard_name(r) for r in range(world_size))]}
    _publish(out, meta)
    return json.loads(meta_file.read_text(encoding="utf-8"))


def read_building(out: Path) -> dict:
    meta = json.loads((out / META).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT or meta.get("meta_sha256") != meta_checksum(meta):
        raise IndexFormatError(f"{out / META}: not the manifest of a sharded build")
    return meta


def stage1_done(out: Path) -> bool:
    return (out / STAGE1_DIR / "done.json").is_file()


def write_stage1_done(out: Path, info: dict) -> None:
    """Mark ``OUT/stage1`` complete (after its arrays are renamed into place): what the other ranks wait for."""
    d = out / STAGE1_DIR
    tmp = partial_name(d, "done.json")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, d / "done.json")
    fsync_path(d, directory=True)


def finish(out: Path, world_size: int) -> dict:
    """Rank 0, once every shard is complete: publish the manifest over them."""
    meta = read_building(out)
    shards = []
    for r in range(world_size):
        sm = read_meta(out / shard_name(r), TOKEN_FORMAT)
        if sm.get("state") != "complete":
            raise IndexFormatError(f"{out / shard_name(r)}: shard {r} is not complete")
        shards.append({"dir": shard_name(r), "documents": sm["documents"], "tokens": sm["tokens"],
                       "meta_sha256": sm["meta_sha256"]})
    _check_ids_unique_across(out, shards)
    first = read_meta(out / shards[0]["dir"], TOKEN_FORMAT)
    meta.update(state="complete", shards=shards, documents=sum(s["documents"] for s in shards),
                tokens=sum(s["tokens"] for s in shards),
                **{k: first[k] for k in ("dim", "token_dtype", "stage1", "ncentroids", "nprobe", "ndocs", "seed")})
    _publish(out, meta)
    return meta


def _check_ids_unique_across(out: Path, shards: list[dict]) -> None:
    """Each shard refused its own repeated ids; an id in two shards is found here, by its 64-bit hash (8 bytes
    a document) and then confirmed on the ids themselves."""
    from fastrank.index.token_stream import id_hash

    hashes, owner = [], []
    for r, s in enumerate(shards):
        index = TokenIndex.load(out / s["dir"])
        hashes.append(np.fromiter((id_hash(json.dumps(i, ensure_ascii=False).encode("utf-8"))
                                   for i in index.iter_ids()), dtype=np.int64, count=len(index)))
        owner.append(np.full(len(index), r, dtype=np.int32))
    h, o = np.concatenate(hashes), np.concatenate(owner)
    pos = np.concatenate([np.arange(len(x)) for x in hashes])
    order = np.argsort(h, kind="stable")
    same = np.flatnonzero(h[order][1:] == h[order][:-1])
    for j in same:
        a, b = order[j], order[j + 1]
        ia = TokenIndex.load(out / shards[o[a]]["dir"]).ids[int(pos[a])]
        ib = TokenIndex.load(out / shards[o[b]]["dir"]).ids[int(pos[b])]
        if ia == ib:
            raise ValueError(f"document id {ia!r} is in shard {o[a]} and shard {o[b]}: the corpus repeats it (each "
                             "document needs its own id)")


class ShardedTokenIndex:
    """The shards of a distributed build, searched together (see the module docstring)."""

    def __init__(self, shards: list[TokenIndex], meta: dict):
        self.shards, self.meta = shards, meta
        self.dim, self.token_dtype, self.stage1 = meta["dim"], meta["token_dtype"], meta["stage1"]
        self.ncentroids, self.nprobe, self.ndocs = meta["ncentroids"], meta["nprobe"], meta["ndocs"]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardedTokenIndex({len(self.shards)} shards, {len(self)} documents, {self.num_tokens} tokens)"

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def ids(self) -> list:
        return [i for s in self.shards for i in s.ids]

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu", mmap: bool = True, verify: bool = False
             ) -> "ShardedTokenIndex":
        path = Path(path)
        meta = read_meta(path, FORMAT, ("state", "shards", "build_id", "dim"), VERSION)
        if meta["state"] != "complete":
            raise IndexFormatError(f"{path}: a sharded build still in progress, not an index yet; re-run the same "
                                   "torchrun command to finish it")
        verify_meta_checksum(path, meta)
        verify_files(path, meta, [])
        shards = []
        for i, s in enumerate(meta["shards"]):
            d = path / s["dir"]
            sm = read_meta(d, TOKEN_FORMAT)
            if sm.get("header", {}).get("build_id") != meta["build_id"]:
                raise IndexFormatError(f"{d}: shard {i} belongs to another index (its build id "
                                       f"{sm.get('header', {}).get('build_id')!r}, this index's {meta['build_id']!r})")
            if sm.get("meta_sha256") != s["meta_sha256"]:
                raise IndexFormatError(f"{d}: shard {i} is not the shard this index was built with (its meta.json "
                                       "changed since)")
            shards.append(TokenIndex.load(d, device=device, mmap=mmap, verify=verify))
        return cls(shards, meta)

    def search(self, queries, k: int = 10, **kw):
        """Each shard's :meth:`TokenIndex.search`, merged: the best ``k`` scores per query over all shards."""
        q = as_token_embeddings(queries, "queries")
        parts = [s.search(q, k, **kw) for s in self.shards]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        # Stable, so that equal scores keep shard order (the order a single index's positions would give).
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    # A run from this class's search, exactly as a single index makes one from its own.
    to_run = TokenIndex.to_run


def load_token_index(path: str | os.PathLike, **kw):
    """A token index directory, sharded (:class:`ShardedTokenIndex`) or not (:class:`TokenIndex`)."""
    path = Path(path)
    try:
        fmt = json.loads((path / META).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    return (ShardedTokenIndex if fmt == FORMAT else TokenIndex).load(path, **kw)
