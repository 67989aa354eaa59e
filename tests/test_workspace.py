"""Worker-local git checkouts (real git): cold/warm clones, revisions, unsafe sources."""

from __future__ import annotations

import subprocess

import pytest

from obdask.exceptions import PayloadError
from obdask.workspace import checkout, split_git


def _head(repo) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_clone_then_warm_and_a_revision_worktree(git_repo, tmp_path):
    scratch = tmp_path / "scratch"
    path, warm = checkout(f"git:{git_repo}", "k", str(scratch))
    assert not warm and (scratch / "obdask-git").is_dir()
    with open(f"{path}/app.py") as f:
        assert "return 41" in f.read()
    rev = _head(git_repo)
    tree, warm = checkout(f"git:{git_repo}@{rev}", "k", str(scratch))
    assert warm and tree != path
    assert _head(tree) == rev


@pytest.mark.parametrize("source", ["git:--upload-pack=touch pwned", "git:/repo@--help",
                                    "git:-x@abc"])
def test_sources_that_git_would_read_as_options_are_refused(source, tmp_path):
    with pytest.raises(PayloadError, match="cannot start with '-'"):
        checkout(source, "k", str(tmp_path))
    assert not (tmp_path / "obdask-git").exists()  # git never ran


def test_split_git_keeps_scp_style_urls():
    assert split_git("git:git@host:org/repo") == ("git@host:org/repo", None)
    assert split_git("git:git@host:org/repo@v1") == ("git@host:org/repo", "v1")
    assert split_git("git:/srv/repo@abc123") == ("/srv/repo", "abc123")
