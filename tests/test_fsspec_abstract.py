"""fsspec's own abstract test suite (`fsspec.tests.abstract`) on `mistral://`.

The store is flat: the root holds purpose folders, which hold files and no folder.
So the suite's `source` and `target` are purposes (the emulator takes any), and the
cases whose scenario builds folders inside a folder cannot apply: each is listed
below, and in docs/PYTHON.md, with its reason.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
from conftest import RunningEmulator, emulator_process_with
from emulator_admin import empty_account
from fsspec.tests.abstract import (
    AbstractCopyTests,
    AbstractFixtures,
    AbstractGetTests,
    AbstractOpenTests,
    AbstractPipeTests,
    AbstractPutTests,
)

from mistralfs.pyfs import MistralFileSystem

# A filesystem's finalizer that fails (say, blocking on a trio thread) fails the test.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with emulator_process_with(tmp_path_factory.mktemp("abstract")) as running:
        yield running


class MistralFixtures(AbstractFixtures):
    @pytest.fixture
    def fs(self, server: RunningEmulator) -> Iterator[MistralFileSystem]:
        fs = fsspec.filesystem(
            "mistral", api_key=server.api_key, server_url=server.url, skip_instance_cache=True
        )
        yield fs
        fs.close()
        empty_account(server.url, server.api_key)

    @pytest.fixture
    def fs_join(self) -> Any:
        return posixpath.join

    @pytest.fixture
    def fs_path(self) -> str:
        return ""  # the root: `source` and `target` are purpose folders


class MistralFilesFixtures(MistralFixtures):
    @pytest.fixture
    def fs_path(self) -> str:
        return "batch"  # `target` is a file: files live in purpose folders


# The cases that cannot apply to a flat store, and why (docs/PYTHON.md lists them too).
REMOTE_TREE = (
    "its scenario builds folders inside a folder on the store (source/subdir/...); "
    "a purpose folder holds files only"
)
NEW_SUBFOLDER = "it writes into a new folder inside a folder (target/newdir/...)"
LOCAL_TREE = "it puts a local tree with subfolders, which would need folders in the purpose"
TOP_LEVEL = (
    "its source is a folder at the store's root (a purpose): fsspec's other_paths "
    "cannot give a top-level folder a parent (as for a whole S3 bucket)"
)
NOT_APPLICABLE = {
    AbstractCopyTests: {
        name: REMOTE_TREE
        for name in dir(AbstractCopyTests)
        if name.startswith("test_") and name != "test_copy_with_source_and_destination_as_list"
    },
    AbstractGetTests: {
        **{
            name: REMOTE_TREE
            for name in dir(AbstractGetTests)
            if name.startswith("test_") and name != "test_get_with_source_and_destination_as_list"
        },
        "test_get_directory_recursive": TOP_LEVEL,
    },
    AbstractPutTests: {
        "test_put_file_to_new_directory": NEW_SUBFOLDER,
        "test_put_file_to_file_in_new_directory": NEW_SUBFOLDER,
        "test_put_glob_to_new_directory": NEW_SUBFOLDER,
        "test_put_glob_edge_cases": NEW_SUBFOLDER + ", in every case",
        "test_put_list_of_files_to_new_directory": NEW_SUBFOLDER,
        "test_put_directory_to_existing_directory": LOCAL_TREE,
        "test_put_directory_to_new_directory": LOCAL_TREE,
        "test_put_glob_to_existing_directory": LOCAL_TREE,
        "test_put_directory_recursive": LOCAL_TREE,
        "test_put_directory_without_files_with_same_name_prefix": LOCAL_TREE,
    },
}


def _with_skips(cls: type) -> type:
    """`cls` with the cases of its abstract base that cannot apply skipped, with why."""
    for base, cases in NOT_APPLICABLE.items():
        if issubclass(cls, base):
            for name, reason in cases.items():
                setattr(cls, name, pytest.mark.skip(reason=reason)(getattr(base, name)))
    return cls


@_with_skips
class TestMistralCopy(MistralFixtures, AbstractCopyTests):
    pass


@_with_skips
class TestMistralGet(MistralFixtures, AbstractGetTests):
    pass


@_with_skips
class TestMistralPut(MistralFixtures, AbstractPutTests):
    pass


class TestMistralOpen(MistralFilesFixtures, AbstractOpenTests):
    pass


class TestMistralPipe(MistralFilesFixtures, AbstractPipeTests):
    pass


def test_the_cases_left_out_are_the_suites_own() -> None:
    """A case renamed upstream must not stay skipped here under a name that is gone."""
    for base, cases in NOT_APPLICABLE.items():
        assert set(cases) <= {n for n in dir(base) if n.startswith("test_")}
    ran = [
        n for b, c in NOT_APPLICABLE.items() for n in dir(b) if n.startswith("test_") and n not in c
    ]
    assert len(ran) >= 5, ran
