"""pipeline.sources: listing local folders and fsspec URLs, and reading bytes."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from pipeline.sources import SourceError, SourceItem, list_images, read_bytes

EXTS = (".jpg", ".jpeg", ".png")


def write(path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def tree(tmp_path):
    """A small folder tree: nested images, other files, hidden ones, odd-case extensions."""
    root = tmp_path / "photos"
    expected = [
        write(root / "a.jpg", b"aa"),
        write(root / "B.JPG", b"bbb"),
        write(root / "sub" / "c.png"),
        write(root / "sub" / "deeper" / "d.Jpeg"),
    ]
    write(root / "notes.txt")
    write(root / "sub" / "archive.zip")
    write(root / ".hidden.jpg")
    write(root / ".cache" / "e.jpg")
    write(root / "sub" / ".thumbs" / "f.png")
    return root, sorted(expected)


def uris(items: list[SourceItem]) -> list[str]:
    return [item.uri for item in items]


def test_recursive_listing_filters_and_skips_hidden(tree):
    root, expected = tree
    items = list_images(str(root), extensions=EXTS)
    assert uris(items) == expected
    assert all(os.path.isabs(uri) for uri in uris(items))
    assert {item.uri: item.size for item in items}[str(root / "B.JPG")] == 3


def test_extension_filter_is_case_insensitive_both_ways(tree):
    root, _ = tree
    assert uris(list_images(str(root), extensions=(".JPG",))) == [str(root / "B.JPG"), str(root / "a.jpg")]


def test_sizes_match_the_files(tree):
    root, _ = tree
    for item in list_images(str(root), extensions=EXTS):
        assert item.size == os.path.getsize(item.uri)


def test_listing_is_sorted_and_repeatable(tmp_path):
    for name in ["z.jpg", "m.jpg", "a/b.jpg", "a.jpg", "A.jpg", "a b.jpg"]:
        write(tmp_path / name)
    first = uris(list_images(str(tmp_path), extensions=EXTS))
    assert first == sorted(first)
    assert first == uris(list_images(str(tmp_path), extensions=EXTS))


def test_limit_takes_first_after_sorting(tree):
    root, expected = tree
    assert uris(list_images(str(root), extensions=EXTS, limit=2)) == expected[:2]
    assert list_images(str(root), extensions=EXTS, limit=0) == []
    assert uris(list_images(str(root), extensions=EXTS, limit=100)) == expected


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path):
    root = tmp_path / "root"
    write(root / "a.jpg")
    write(root / "sub" / "b.jpg")
    os.symlink(root, root / "sub" / "loop")  # points back up the tree
    os.symlink(root / "sub", root / "sub_again")  # a second name for a folder already walked
    assert uris(list_images(str(root), extensions=EXTS)) == [str(root / "a.jpg"), str(root / "sub" / "b.jpg")]


def test_symlinked_folder_and_file_are_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    write(outside / "x.jpg")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "linked")
    os.symlink(outside / "x.jpg", root / "y.jpg")
    os.symlink(tmp_path / "nothing.jpg", root / "dangling.jpg")
    items = list_images(str(root), extensions=EXTS)
    assert uris(items) == [str(root / "linked" / "x.jpg"), str(root / "y.jpg")]
    assert [item.size for item in items] == [1, 1]


def test_single_file_source(tree):
    root, _ = tree
    assert list_images(str(root / "B.JPG"), extensions=EXTS) == [SourceItem(str(root / "B.JPG"), 3)]


def test_relative_and_file_url_sources_give_absolute_paths(tree, monkeypatch):
    root, expected = tree
    monkeypatch.chdir(root.parent)
    assert uris(list_images("photos", extensions=EXTS)) == expected
    assert uris(list_images(f"file://{root}", extensions=EXTS)) == expected


def test_missing_source_names_the_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(SourceError, match="no_such_folder.*does not exist"):
        list_images(str(missing), extensions=EXTS)


def test_unlistable_source_folder_is_a_source_error(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(SourceError, match="cannot list .*Permission denied"):
        list_images(str(tmp_path), extensions=EXTS)


def test_unknown_protocol_is_a_source_error():
    with pytest.raises(SourceError, match="nosuchproto"):
        list_images("nosuchproto://bucket/x", extensions=EXTS)


def test_non_utf8_and_long_names_list_and_read(tmp_path):
    raw_dir = os.fsencode(tmp_path)
    with open(os.path.join(raw_dir, b"caf\xe9.jpg"), "wb") as handle:
        handle.write(b"latin-1 name")
    long_name = "n" * 250 + ".jpg"
    write(tmp_path / long_name, b"long")
    items = list_images(str(tmp_path), extensions=EXTS)
    assert len(items) == 2
    assert sorted(read_bytes(item.uri) for item in items) == [b"latin-1 name", b"long"]


def test_read_bytes_local_with_limit(tmp_path):
    path = write(tmp_path / "a.jpg", b"0123456789")
    assert read_bytes(path) == b"0123456789"
    assert read_bytes(path, max_bytes=4) == b"0123"
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "gone.jpg"))


@pytest.fixture
def memory_source():
    fs = fsspec.filesystem("memory")
    root = f"/captioner-test-{uuid.uuid4().hex}"
    files = {
        "a.jpg": b"a",
        "Sub/b.PNG": b"bb",
        "sub/deep/c.jpeg": b"ccc",
        "readme.txt": b"t",
        ".hidden.jpg": b"h",
        ".trash/d.jpg": b"d",
    }
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    yield root
    fs.rm(root, recursive=True)


def test_memory_fsspec_listing(memory_source):
    items = list_images(f"memory://{memory_source}", extensions=EXTS)
    base = f"memory://{memory_source}"
    assert items == [
        SourceItem(f"{base}/Sub/b.PNG", 2),
        SourceItem(f"{base}/a.jpg", 1),
        SourceItem(f"{base}/sub/deep/c.jpeg", 3),
    ]
    assert [read_bytes(item.uri) for item in items] == [b"bb", b"a", b"ccc"]
    assert uris(list_images(base, extensions=EXTS, limit=1)) == [f"{base}/Sub/b.PNG"]
    assert list_images(f"{base}/a.jpg", extensions=EXTS) == [SourceItem(f"{base}/a.jpg", 1)]


def test_memory_missing_source(memory_source):
    with pytest.raises(SourceError, match="does not exist"):
        list_images(f"memory://{memory_source}/nothing-here", extensions=EXTS)
