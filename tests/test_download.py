"""Tests for `prepare.py download` (and its upstream-named alias) against fake hubs: never the network.

Two stand-ins for huggingface_hub's hf_hub_download(local_dir=...): FakeHub writes regular files under local_dir
and resumes an interrupted file from local_dir/.cache, as versions from 0.23 do (recent ones, 2.4, write regular
files too but restart an interrupted file); OldFakeHub returns files over a size threshold (5 MB in the
real library) as relative symlinks into a cache folder, as versions < 0.23 do.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest

from conftest import ROOT, sample_texts

import prepare  # noqa: E402  (conftest puts data/ on sys.path)

SP4096 = "fineweb10B_sp4096"
KEVCLARK, WILLDEPUEOAI = "kevclark/parameter-golf", "willdepueoai/parameter-golf"
ALIAS = ROOT / "data" / "cached_challenge_fineweb.py"
REAL_HUB_FUNCTIONS = (huggingface_hub.hf_hub_download, huggingface_hub.HfApi.list_repo_files)  # before no_network


def tg():
    import train_gpt
    return train_gpt


def upstream_manifest(vocab: int, n_val: int, n_train: int) -> dict:
    """A manifest in upstream's format (the fields its writer records)."""
    name, tok = f"fineweb10B_sp{vocab}", f"sp_bpe_{vocab}"
    return {
        "datasets": [{"name": name, "tokenizer_name": tok, "path": f"datasets/{name}",
                      "train_glob": f"datasets/{name}/fineweb_train_*.bin",
                      "val_glob": f"datasets/{name}/fineweb_val_*.bin", "vocab_size": vocab, "bos_id": 1,
                      "eos_id": 2, "tokenizer_kind": "sentencepiece",
                      "stats": {"files_train": n_train, "files_val": n_val, "docs_total": 1000}}],
        "tokenizers": [{"name": tok, "kind": "sentencepiece", "vocab_size": vocab,
                        "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                        "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"}],
    }


def make_repo(base: Path, tokenizer: Path, vocab: int, n_val: int = 1, n_train: int = 3, seed: int = 0,
              manifest: bool = True) -> Path:
    """Lay out one export under `base` (the remote root): val shards of 3000+i tokens, train of 2000+i."""
    import sentencepiece as spm
    sd, td = base / "datasets" / f"fineweb10B_sp{vocab}", base / "tokenizers"
    sd.mkdir(parents=True)
    td.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, n, size in (("val", n_val, 3000), ("train", n_train, 2000)):
        for i in range(n):
            prepare.write_shard(sd / f"fineweb_{split}_{i:06d}.bin", rng.integers(0, vocab, size + i))
    shutil.copyfile(tokenizer, td / f"fineweb_{vocab}_bpe.model")
    prepare._write_vocab(spm.SentencePieceProcessor(model_file=str(tokenizer)), td / f"fineweb_{vocab}_bpe.vocab")
    if manifest:
        write_manifest(base, upstream_manifest(vocab, n_val, n_train))
    return base


def write_manifest(base: Path, manifest: dict) -> None:
    (base / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


class RepositoryNotFoundError(Exception):
    """Named like huggingface_hub's: a missing repo is not a missing file."""


class FakeHub:
    """huggingface_hub >= 0.23 with local_dir: regular files; an interrupted download resumes from
    local_dir/.cache/huggingface/download/<path>.incomplete. `cut[path] = n` drops the connection once, after
    n bytes of that file."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.calls, self.listed = repos, [], 0
        self.cut: dict[str, int] = {}
        self.resumed: dict[str, int] = {}

    def source(self, repo_id: str, remote_path: str) -> bytes:
        if repo_id not in self.repos:
            raise RepositoryNotFoundError(f"404 Client Error: repository {repo_id} not found")
        src = self.repos[repo_id] / remote_path
        if not src.is_file():
            raise FileNotFoundError(remote_path)
        return src.read_bytes()

    def list_files(self, repo_id: str) -> list[str]:
        self.listed += 1
        if repo_id not in self.repos:
            raise RepositoryNotFoundError(repo_id)
        root = self.repos[repo_id]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def fetch(self, repo_id: str, remote_path: str, dest_dir) -> str:
        self.calls.append(remote_path)
        data = self.source(repo_id, remote_path)
        part = Path(dest_dir) / ".cache" / "huggingface" / "download" / f"{remote_path}.incomplete"
        part.parent.mkdir(parents=True, exist_ok=True)
        start = part.stat().st_size if part.exists() else 0
        if start:
            self.resumed[remote_path] = start
        with open(part, "ab") as f:
            if remote_path in self.cut:
                f.write(data[start:self.cut.pop(remote_path)])
                raise ConnectionError("connection reset by peer")
            f.write(data[start:])
        dst = Path(dest_dir) / remote_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dst)
        return str(dst)


class OldFakeHub(FakeHub):
    """huggingface_hub < 0.23 with local_dir: files over `link_over` bytes land in a cache folder and come back
    as relative symlinks to it (the manifest, ~1 kB, stays a regular file)."""
    link_over = 1500

    def __init__(self, repos: dict[str, Path], cache: Path):
        super().__init__(repos)
        self.cache, self.links = cache, 0

    def fetch(self, repo_id: str, remote_path: str, dest_dir) -> str:
        self.calls.append(remote_path)
        data = self.source(repo_id, remote_path)
        dst = Path(dest_dir) / remote_path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        if len(data) <= self.link_over:
            dst.write_bytes(data)
            return str(dst)
        blob = self.cache / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dst.symlink_to(os.path.relpath(blob, dst.parent))
        self.links += 1
        return str(dst)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any call that would reach the real hub fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test reached huggingface_hub's network functions")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)


@pytest.fixture
def hub(request, tmp_path):
    """The sp4096 repo (1 val + 3 train shards under datasets/) behind a new (default) or old fake hub."""
    root = tmp_path / "remote"
    make_repo(root / "datasets", prepare.SAMPLE_TOKENIZER, 4096)
    if getattr(request, "param", "new") == "old":
        return OldFakeHub({KEVCLARK: root}, tmp_path / "cache")
    return FakeHub({KEVCLARK: root})


both_hubs = pytest.mark.parametrize("hub", ["new", "old"], indirect=True)


def remote_file(hub, rel: str) -> Path:
    return hub.repos[KEVCLARK] / "datasets" / rel


def run_download(hub, data_dir, n=2, **kw):
    kw = {"fetch": hub.fetch, "list_files": hub.list_files, **kw}
    return prepare.download("sp4096", data_dir=data_dir, train_shards=n, **kw)


def all_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


@both_hubs
def test_download_lands_regular_verified_files(hub, tmp_path):
    data = tmp_path / "data"
    ds = run_download(hub, data)
    assert ds == data / "datasets" / SP4096
    want = ["manifest.json", "tokenizers/fineweb_4096_bpe.model", "tokenizers/fineweb_4096_bpe.vocab"] + [
        f"datasets/{SP4096}/fineweb_{s}.bin" for s in ("train_000000", "train_000001", "val_000000")]
    files = all_files(data)
    assert sorted(files) == sorted(want)  # nothing else: no staging folder, no .part file
    for rel, p in files.items():
        assert not p.is_symlink() and p.is_file(), rel
        assert p.read_bytes() == remote_file(hub, rel).read_bytes(), rel
    assert tg().read_shard_header(ds / "fineweb_train_000001.bin") == 2001
    assert hub.listed == 0 and not any("train_000002" in c for c in hub.calls)  # the manifest drives it
    if isinstance(hub, OldFakeHub):
        assert hub.links == 5  # shards and tokenizer came back as links into the cache, and still work
        assert all(p.is_file() for p in (tmp_path / "cache" / "blobs").iterdir())  # the cache keeps its blobs


def test_download_listing_fallback_is_pinned_to_one_root(hub, tmp_path, capsys):
    """Without a manifest on the hub the listing is used, only under the remote root: a second export of the
    same dataset elsewhere in the repo (shorter tokenizer path, an extra train shard) is never mixed in."""
    root = hub.repos[KEVCLARK]
    (root / "datasets" / "manifest.json").unlink()
    make_repo(root / "v2", prepare.SAMPLE_TOKENIZER, 4096, n_train=4, seed=1, manifest=False)
    ds = run_download(hub, tmp_path / "a", n=3)
    assert "note: no datasets/manifest.json" in capsys.readouterr().err and hub.listed == 1
    assert not (tmp_path / "a" / "manifest.json").exists()  # nothing to copy; never a made-up one
    names = sorted(p.name for p in ds.iterdir())
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin",
                     "fineweb_val_000000.bin"]
    for n in names:
        assert (ds / n).read_bytes() == (root / "datasets" / "datasets" / SP4096 / n).read_bytes()
    # the other root, named as MATCHED_FINEWEB_REMOTE_ROOT_PREFIX would name it, gives the other export
    ds_b = run_download(hub, tmp_path / "b", n=4, remote_root="v2")
    for n in names + ["fineweb_train_000003.bin"]:
        assert (ds_b / n).read_bytes() == (root / "v2" / "datasets" / SP4096 / n).read_bytes()
    with pytest.raises(prepare.PrepareError, match=rf"{KEVCLARK} has 3 {SP4096} train shards, 4 requested"):
        run_download(hub, tmp_path / "c", n=4)


def test_download_counts_and_tokenizer_come_from_the_manifest(hub, tmp_path, capsys):
    root = hub.repos[KEVCLARK] / "datasets"
    m = upstream_manifest(4096, n_val=2, n_train=2)  # the hub holds 3 train shards, the manifest lists 2
    m["tokenizers"][0]["model_path"] = "tokenizers/v2/sp4096.model"
    write_manifest(root, m)
    (root / "tokenizers" / "v2").mkdir()
    os.replace(root / "tokenizers" / "fineweb_4096_bpe.model", root / "tokenizers" / "v2" / "sp4096.model")
    prepare.write_shard(root / "datasets" / SP4096 / "fineweb_val_000001.bin", np.arange(50))
    with pytest.raises(prepare.PrepareError, match=f"lists 2 {SP4096} train shards, 3 requested"):
        run_download(hub, tmp_path / "data", n=3)

    def no_listing(repo_id):
        raise AssertionError("the listing must not be needed when the manifest is there")
    data = tmp_path / "data"
    ds = run_download(hub, data, n=2, list_files=no_listing)
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                    "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    model = data / "tokenizers" / "v2" / "sp4096.model"
    assert model.read_bytes() == prepare.SAMPLE_TOKENIZER.read_bytes()
    assert f"TOKENIZER_PATH={model}" in capsys.readouterr().err
    assert json.loads((data / "manifest.json").read_text()) == m


def test_download_checks_manifest_checksums(hub, tmp_path):
    root = hub.repos[KEVCLARK] / "datasets"
    rel = f"datasets/{SP4096}/fineweb_train_000001.bin"
    m = upstream_manifest(4096, 1, 3)
    m["sha256"] = {rel: "0" * 64}
    write_manifest(root, m)
    data = tmp_path / "data"
    with pytest.raises(prepare.PrepareError, match="fineweb_train_000001.bin: sha256 differs from the manifest's"):
        run_download(hub, data)
    assert not (data / rel).exists() and not (data / ".download-fineweb10B_sp4096" / "datasets" / rel).exists()
    m["sha256"] = {rel: prepare.sha256_file(root / rel).upper()}
    write_manifest(root, m)
    run_download(hub, data)
    # same size and a valid header, other tokens: only the checksum can tell, and the file is fetched again
    raw = bytearray((data / rel).read_bytes())
    raw[-1] ^= 1
    (data / rel).write_bytes(bytes(raw))
    hub.calls.clear()
    run_download(hub, data)
    assert hub.calls == ["datasets/manifest.json", f"datasets/{rel}"]
    assert (data / rel).read_bytes() == (root / rel).read_bytes()


@pytest.mark.parametrize("edit, pattern", [
    ("dataset", rf"datasets/manifest.json in hub dataset {KEVCLARK} does not list dataset {SP4096} "
                r"\(it lists: fineweb10B_sp1024\)$"),
    ("tokenizer", r"does not list tokenizer 'sp_bpe_4096' \(used by fineweb10B_sp4096\)$"),
    ("vocab", r"dataset fineweb10B_sp4096 has vocab_size 1024, expected 4096"),
    ("path", r"bad file path '\.\./\.\./evil\.model'"),
    ("json", r"datasets/manifest.json in hub dataset kevclark/parameter-golf: not readable JSON"),
])
def test_download_manifest_errors(hub, tmp_path, edit, pattern):
    root = hub.repos[KEVCLARK] / "datasets"
    m = upstream_manifest(4096, 1, 3)
    if edit == "dataset":
        m = upstream_manifest(1024, 1, 3)
    elif edit == "tokenizer":
        m["tokenizers"][0]["name"] = "sp_bpe_4096_v2"
    elif edit == "vocab":
        m["datasets"][0]["vocab_size"] = 1024
    elif edit == "path":
        m["tokenizers"][0]["vocab_path"] = "../../evil.model"
    write_manifest(root, m)
    if edit == "json":
        (root / "manifest.json").write_text('{"datasets": [', encoding="utf-8")
    data = tmp_path / "data"
    with pytest.raises(prepare.PrepareError, match=pattern) as ei:
        run_download(hub, data)
    assert "\n" not in str(ei.value)
    assert not (data / "manifest.json").exists() and not (data / "datasets").exists()


def test_download_skip_manifest_uses_the_local_one(hub, tmp_path):
    data = tmp_path / "data"
    with pytest.raises(prepare.PrepareError, match=r"--skip-manifest needs .*data/manifest.json; run without "):
        run_download(hub, data, skip_manifest=True)
    assert not data.exists() and hub.calls == []
    data.mkdir()
    write_manifest(data, upstream_manifest(1024, 1, 10))  # e.g. left by an sp1024 download from the other repo
    with pytest.raises(prepare.PrepareError, match=r"data/manifest.json does not list dataset fineweb10B_sp4096 "
                                                   r"\(it lists: fineweb10B_sp1024\): delete it and run without "
                                                   r"--skip-manifest"):
        run_download(hub, data, skip_manifest=True)
    write_manifest(data, upstream_manifest(4096, 1, 3))
    (hub.repos[KEVCLARK] / "datasets" / "manifest.json").unlink()  # only the local copy can serve now
    ds = run_download(hub, data, n=3, skip_manifest=True)
    assert len(list(ds.glob("fineweb_train_*.bin"))) == 3 and "datasets/manifest.json" not in hub.calls


@pytest.mark.parametrize("manifest", [True, False])
def test_download_names_a_missing_shard_index(hub, tmp_path, manifest):
    root = hub.repos[KEVCLARK] / "datasets"
    (root / "datasets" / SP4096 / "fineweb_train_000001.bin").unlink()
    if not manifest:
        (root / "manifest.json").unlink()
    with pytest.raises(prepare.PrepareError, match=rf"datasets/datasets/{SP4096}/fineweb_train_000001\.bin (is "
                                                   rf"missing from|not found in) hub dataset {KEVCLARK}"):
        run_download(hub, tmp_path / "a", n=3)
    assert not (tmp_path / "a" / "datasets" / SP4096 / "fineweb_train_000001.bin").exists()
    # a gap above the requested count does not matter
    ds = run_download(hub, tmp_path / "b", n=1)
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]


def test_download_interrupted_file_resumes_and_never_sits_in_place(hub, tmp_path):
    data = tmp_path / "data"
    remote = f"datasets/datasets/{SP4096}/fineweb_train_000001.bin"
    hub.cut[remote] = 3000
    with pytest.raises(prepare.PrepareError, match=f"fetching {remote} from {KEVCLARK} failed: ConnectionError"):
        run_download(hub, data)
    ds = data / "datasets" / SP4096
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    staged = data / f".download-{SP4096}" / ".cache" / "huggingface" / "download" / f"{remote}.incomplete"
    assert staged.stat().st_size == 3000  # the staging folder outlives the failed run
    hub.calls.clear()
    run_download(hub, data)
    assert hub.calls == ["datasets/manifest.json", remote] and hub.resumed == {remote: 3000}
    assert (ds / "fineweb_train_000001.bin").read_bytes() == (hub.repos[KEVCLARK] / remote).read_bytes()
    assert sorted(p.name for p in data.iterdir()) == ["datasets", "manifest.json", "tokenizers"]


@pytest.mark.parametrize("hub", ["old"], indirect=True)
def test_download_interrupted_copy_leaves_no_partial_file(hub, tmp_path, monkeypatch):
    """Older hubs hand back cache links, so the file is copied into place: a copy cut short (Ctrl-C, full disk)
    leaves neither a partial shard nor a .part file behind."""
    real_copy = shutil.copyfile

    def half_copy(src, dst):
        if Path(dst).name == ".fineweb_train_000001.bin.part":
            Path(dst).write_bytes(Path(src).read_bytes()[:1000])
            raise KeyboardInterrupt
        return real_copy(src, dst)
    monkeypatch.setattr(prepare.shutil, "copyfile", half_copy)
    data = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        run_download(hub, data)
    ds = data / "datasets" / SP4096
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    monkeypatch.setattr(prepare.shutil, "copyfile", real_copy)
    run_download(hub, data)
    assert tg().read_shard_header(ds / "fineweb_train_000001.bin") == 2001


@both_hubs
@pytest.mark.parametrize("damage, pattern", [
    ("truncate", r"fineweb_train_000001\.bin.*header says 2001 tokens"),
    ("magic", r"bad magic"),
])
def test_download_rejects_bad_remote_shard(hub, tmp_path, damage, pattern):
    bad = remote_file(hub, f"datasets/{SP4096}/fineweb_train_000001.bin")
    good = bad.read_bytes()
    raw = bytearray(good)
    if damage == "truncate":
        raw = raw[:-7]
    else:
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
    bad.write_bytes(bytes(raw))
    data = tmp_path / "data"
    with pytest.raises(prepare.PrepareError, match=pattern) as ei:
        run_download(hub, data)
    assert f"downloaded datasets/datasets/{SP4096}/fineweb_train_000001.bin from {KEVCLARK} does not verify" \
        in str(ei.value)
    ds = data / "datasets" / SP4096
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    bad.write_bytes(good)  # fixed upstream: the next run fetches it afresh, not the bad staged copy
    run_download(hub, data)
    assert (ds / "fineweb_train_000001.bin").read_bytes() == good


def test_download_rerun_skips_verified_and_refetches_the_rest(hub, tmp_path):
    data = tmp_path / "data"
    ds = run_download(hub, data)
    hub.calls.clear()
    run_download(hub, data)
    assert hub.calls == ["datasets/manifest.json"]  # everything else present and verified
    local = ds / "fineweb_train_000000.bin"
    local.write_bytes(local.read_bytes()[:-2])  # a damaged local file
    vocab = data / "tokenizers" / "fineweb_4096_bpe.vocab"
    vocab.unlink()  # a dangling link, as the earlier downloader left with huggingface_hub < 0.23
    vocab.symlink_to("../../cache/blobs/0123abcd")
    hub.calls.clear()
    run_download(hub, data)
    assert hub.calls == ["datasets/manifest.json", "datasets/tokenizers/fineweb_4096_bpe.vocab",
                         f"datasets/datasets/{SP4096}/fineweb_train_000000.bin"]
    assert tg().read_shard_header(local) == 2000 and vocab.is_file() and not vocab.is_symlink()
    hub.calls.clear()
    run_download(hub, data, n=3)  # asking for more fetches only the new one
    assert hub.calls == ["datasets/manifest.json", f"datasets/datasets/{SP4096}/fineweb_train_000002.bin"]


def test_download_with_docs(hub, tmp_path):
    root = hub.repos[KEVCLARK] / "datasets"
    docs = [{"text": t} for t in sample_texts(3)]
    (root / "docs_selected.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (root / "docs_selected.source_manifest.json").write_text('{"num_docs": 3}', encoding="utf-8")
    data = tmp_path / "data"
    run_download(hub, data, n=1)
    assert not (data / "docs_selected.jsonl").exists()
    run_download(hub, data, n=1, with_docs=True)
    for name in prepare.DOCS_FILES:
        assert (data / name).read_bytes() == (root / name).read_bytes()
    assert [t for _, t in prepare.iter_documents(data / "docs_selected.jsonl")] == [d["text"] for d in docs]
    (root / "docs_selected.jsonl").write_text("<html>rate limited</html>\n", encoding="utf-8")
    with pytest.raises(prepare.PrepareError, match='docs_selected.jsonl: first line is not a JSON object with a '
                                                   'string "text"'):
        run_download(hub, tmp_path / "other", n=1, with_docs=True)


def test_download_network_errors_are_not_missing_files(hub, tmp_path):
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    assert prepare._is_not_found(FileNotFoundError("x")) and prepare._is_not_found(EntryNotFoundError("x"))
    assert not prepare._is_not_found(LocalEntryNotFoundError("offline"))
    assert not prepare._is_not_found(ConnectionError())

    def broken(*args):
        raise ConnectionError("no route to host")
    with pytest.raises(prepare.PrepareError, match=f"fetching datasets/manifest.json from {KEVCLARK} failed: "
                                                   "ConnectionError: no route to host"):
        run_download(hub, tmp_path / "d", fetch=broken, list_files=broken)
    # the listing is only the fallback: with the manifest there, a broken listing does not matter
    ds = run_download(hub, tmp_path / "e", n=1, list_files=broken)
    assert sorted(p.name for p in ds.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    (hub.repos[KEVCLARK] / "datasets" / "manifest.json").unlink()
    with pytest.raises(prepare.PrepareError, match=f"listing hub dataset {KEVCLARK} failed: ConnectionError"):
        run_download(hub, tmp_path / "f", n=1, list_files=broken)


def test_default_fetchers_match_the_installed_huggingface_hub(monkeypatch, tmp_path):
    """hf_fetch / hf_list_files call the real library with arguments its signatures accept (offline)."""
    import huggingface_hub
    real_download, real_list = REAL_HUB_FUNCTIONS
    seen = {}

    def fake_download(*args, **kwargs):
        seen["download"] = inspect.signature(real_download).bind(*args, **kwargs).arguments
        return str(tmp_path / "x.bin")

    def fake_list(self, *args, **kwargs):
        seen["list"] = inspect.signature(real_list).bind(self, *args, **kwargs).arguments
        return ["a", "b"]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_list)
    assert prepare.hf_fetch(KEVCLARK, "datasets/manifest.json", tmp_path) == tmp_path / "x.bin"
    assert seen["download"] == {"repo_id": KEVCLARK, "filename": "datasets/manifest.json", "repo_type": "dataset",
                                "local_dir": str(tmp_path)}
    assert prepare.hf_list_files(KEVCLARK) == ["a", "b"]
    assert seen["list"]["repo_type"] == "dataset"


def test_sample_and_download_never_overwrite_each_other(hub, tmp_path):
    """A downloaded dataset is not replaced by `sample`, and `download` refuses a folder we built ourselves
    (same file names, different data), unless forced."""
    data = tmp_path / "data"
    ds = run_download(hub, data)
    before = {p.name: p.read_bytes() for p in ds.iterdir()}
    with pytest.raises(prepare.PrepareError, match="is not a sample build"):
        prepare.sample(data, progress=False)
    assert {p.name: p.read_bytes() for p in ds.iterdir()} == before
    built_dir = prepare.sample(tmp_path / "own", progress=False)
    with pytest.raises(prepare.PrepareError, match="holds a dataset built by prepare.py"):
        run_download(hub, tmp_path / "own")
    assert prepare.verify_dataset(built_dir)
    assert oct((tmp_path / "own").stat().st_mode & 0o777) == oct(0o755)  # not mkdtemp's owner-only mode
    prepare.sample(data, progress=False, force=True)  # --force does replace it
    assert prepare.verify_dataset(ds)


# ----------------------------------------------------------------------------- upstream's command lines
@pytest.fixture(scope="module")
def two_repos(tmp_path_factory):
    """Both published repos as upstream lays them out: sp4096 (143 train shards) and sp1024 (20)."""
    base = tmp_path_factory.mktemp("repos")
    tok1024 = prepare.train_tokenizer(sample_texts(300), 1024, base / "sp1024")
    make_repo(base / "kevclark" / "datasets", prepare.SAMPLE_TOKENIZER, 4096, n_train=143)
    make_repo(base / "willdepueoai" / "datasets", tok1024, 1024, n_train=20)
    return {KEVCLARK: base / "kevclark", WILLDEPUEOAI: base / "willdepueoai"}


def run_cli(script: Path, args: list[str], env: dict, hub, data: Path, monkeypatch, capsys) -> tuple[int, str]:
    """Run a command line in-process with the fake hub standing in for huggingface_hub; (exit code, stderr).
    `script` runs as __main__ and must reach the download through the imported `prepare` module (which the
    fake hub patches), as the alias does."""
    for k in (prepare.REPO_ENV, prepare.REMOTE_ROOT_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(prepare, "DATA_ROOT", data)  # the script's own folder, as `data/` is upstream
    monkeypatch.setattr(prepare, "hf_fetch", hub.fetch)
    monkeypatch.setattr(prepare, "hf_list_files", hub.list_files)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as ei:
        runpy.run_path(str(script), run_name="__main__")
    return ei.value.code, capsys.readouterr().err


UPSTREAM_LINES = {  # the record READMEs' and upstream README's lines: (env, args)
    "4096-skip": ({"MATCHED_FINEWEB_REPO_ID": KEVCLARK}, ["--variant", "sp4096", "--skip-manifest"]),
    "4096-143": ({"MATCHED_FINEWEB_REPO_ID": KEVCLARK}, ["--variant", "sp4096", "--train-shards", "143"]),
    "1024-10": ({}, ["--variant", "sp1024", "--train-shards", "10"]),
}


def test_upstream_command_lines_work_as_written(two_repos, tmp_path, monkeypatch, capsys):
    """The three lines, through data/cached_challenge_fineweb.py, in the order a reader of the READMEs meets
    them; the outcome matches upstream's for each."""
    hub = FakeHub(two_repos)
    data = tmp_path / "data"

    def run(line):
        return run_cli(ALIAS, UPSTREAM_LINES[line][1], UPSTREAM_LINES[line][0], hub, data, monkeypatch, capsys)
    rc, err = run("4096-skip")  # nothing local yet: upstream stops too
    assert rc == 2 and err.count("\n") == 1 and "--skip-manifest needs" in err
    rc, err = run("1024-10")
    ds1024 = data / "datasets" / "fineweb10B_sp1024"
    assert rc == 0 and len(list(ds1024.glob("fineweb_train_*.bin"))) == 10
    assert (data / "manifest.json").read_bytes() == (two_repos[WILLDEPUEOAI] / "datasets/manifest.json").read_bytes()
    rc, err = run("4096-skip")  # the local manifest is the other repo's: the #1334 README's line as written
    assert rc == 2 and err.count("\n") == 1 and "does not list dataset fineweb10B_sp4096" in err
    rc, err = run("4096-143")  # the 2026-04-01 README's line (its `rm -f data/manifest.json` is not needed)
    ds4096 = data / "datasets" / SP4096
    assert rc == 0 and len(list(ds4096.glob("fineweb_train_*.bin"))) == 143
    assert (data / "manifest.json").read_bytes() == (two_repos[KEVCLARK] / "datasets/manifest.json").read_bytes()
    hub.calls.clear()
    rc, err = run("4096-skip")  # now the #1334 line works: default 80 shards, all already in place
    assert rc == 0 and hub.calls == [] and "0 files fetched, 83 already present and verified" in err
    assert tg().read_shard_header(ds4096 / "fineweb_train_000142.bin") == 2142


def test_cli_flags_and_env_vars(two_repos, tmp_path, monkeypatch, capsys):
    hub = FakeHub(two_repos)
    script = tmp_path / "prepare_cli.py"  # `python data/prepare.py ...`, run through the patched module
    script.write_text("import sys, prepare\nsys.exit(prepare.main())\n", encoding="utf-8")
    data = tmp_path / "data"
    # the env var picks the repo, --repo-id wins over it; a bare count works as upstream's does
    rc, err = run_cli(script, ["download", "--variant", "sp4096", "--repo-id", KEVCLARK, "2"],
                      {"MATCHED_FINEWEB_REPO_ID": WILLDEPUEOAI}, hub, data, monkeypatch, capsys)
    assert rc == 0 and len(list((data / "datasets" / SP4096).glob("fineweb_train_*.bin"))) == 2
    rc, err = run_cli(script, ["download", "--variant", "sp4096", "1"], {"MATCHED_FINEWEB_REPO_ID": WILLDEPUEOAI},
                      hub, tmp_path / "w", monkeypatch, capsys)
    assert rc == 2 and err.strip() == (f"prepare.py: error: datasets/manifest.json in hub dataset {WILLDEPUEOAI} "
                                       "does not list dataset fineweb10B_sp4096 (it lists: fineweb10B_sp1024)")
    # MATCHED_FINEWEB_REMOTE_ROOT_PREFIX names the folder that holds manifest.json, datasets/ and tokenizers/
    rc, err = run_cli(script, ["download", "--variant", "sp1024", "--train-shards", "1"],
                      {"MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": "elsewhere"}, hub, tmp_path / "x", monkeypatch, capsys)
    assert rc == 2 and "elsewhere/manifest.json" in err and "no elsewhere/datasets/fineweb10B_sp1024" in err
    for args, msg in ((["--variant", "sp4096", "--train-shards", "2", "3"], "given twice"),
                      (["--variant", "gpt2"], "unknown variant 'gpt2'"),
                      (["--variant", "sp4096", "--train-shards", "144"], "lists 143 fineweb10B_sp4096 train shards, "
                                                                         "144 requested")):
        rc, err = run_cli(script, ["download", *args], {}, hub, tmp_path / "y", monkeypatch, capsys)
        assert rc == 2 and err.count("\n") == 1 and msg in err, err
