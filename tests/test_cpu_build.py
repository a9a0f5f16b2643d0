"""The first-use build of the C++ CPU kernel: it says when it starts and ends, and its cache is
keyed on what goes into the binary (sources' content, flags, torch, Python, CPU), never on
where the package is installed."""
import shutil

import torch

from spatialformer_kernels.ops import cpu_backend


def test_cache_folder_depends_on_source_content_not_install_path(tmp_path):
    editable, site_packages = tmp_path / "checkout" / "csrc", tmp_path / "site-packages" / "csrc"
    for folder in (editable, site_packages):
        folder.mkdir(parents=True)
        for source in cpu_backend._source_paths():
            shutil.copyfile(source, folder / source.name)
    flags = ["-O3", "-march=native"]

    def directory(folder, flags=flags):
        return cpu_backend._build_directory([folder / name for name in cpu_backend._SOURCES], flags)

    assert directory(editable) == directory(site_packages)
    assert directory(editable) != directory(editable, ["-O3"])  # flags are part of the key
    (site_packages / "bca_cpu.cpp").write_text((site_packages / "bca_cpu.cpp").read_text() + "\n// changed\n")
    assert directory(editable) != directory(site_packages)  # so is every byte of the sources
    assert f"torch{torch.__version__.replace('+', '_')}" in directory(editable).name


def test_build_announces_start_and_end_once(tmp_path, monkeypatch, capsys):
    """With torch's compiler stubbed (it writes the library, as a build would): one line when the
    build starts and one when it ends, with the folder and the seconds; nothing when cached."""
    import torch.utils.cpp_extension

    calls = []

    def fake_load(name, sources, build_directory, **kwargs):  # like ninja: builds only what is missing
        calls.append(sources)
        library = cpu_backend.Path(build_directory) / f"{name}.so"
        if not library.exists():
            library.write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setenv("SPATIALFORMER_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.ops, "sfk_test_namespace", type("Ops", (), {"vector_isa": staticmethod(lambda: "avx2")}),
                        raising=False)

    cpu_backend._load(["-O3"], "sfk_test_namespace", "portable")
    first = capsys.readouterr().err.strip().splitlines()
    directory = cpu_backend._build_directory(cpu_backend._source_paths(), ["-O3"])
    assert len(first) == 2, first
    assert first[0].startswith("spatialformer_kernels: building the C++ CPU kernel (portable) in ")
    assert str(directory) in first[0]
    assert first[1].startswith("spatialformer_kernels: built the C++ CPU kernel (avx2) in ")
    assert " s, cached in " in first[1] and str(directory) in first[1]
    # compiled from the cache folder's own copy of the sources, not the install path
    assert calls[0] == [str(directory / "src" / "bca_cpu.cpp")]
    assert (directory / "src" / "bca_cpu_kernels.h").read_bytes() == cpu_backend._source_paths()[1].read_bytes()

    cpu_backend._load(["-O3"], "sfk_test_namespace", "portable")  # cached: the library is unchanged
    assert capsys.readouterr().err == ""

