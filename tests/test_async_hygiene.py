"""An asynchronous client behaves as a synchronous one: cluster budgets, no blocking I/O
on its event loop (gen_cluster: scheduler, worker and client share one loop)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

import obdask  # noqa: F401  (before distributed.utils_test snapshots the config)

pytest.importorskip("ollama")

import fsspec  # noqa: E402
from distributed.utils_test import gen_cluster  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from obdask.exceptions import BudgetExceeded, ModelError  # noqa: E402
from obdask.llm import budget as B  # noqa: E402
from obdask.llm.client import call_model  # noqa: E402
from obdask.plan import Plan  # noqa: E402
from obdask.testing import OllamaTestServer  # noqa: E402

FAST = {"obdask.llm.backoff": "10ms", "obdask.llm.budget-timeout": "5s"}


pytestmark = pytest.mark.usefixtures("fresh_llm_state")


def _call(url: str, plan: str = "p") -> int:
    return call_model("m1", "hello world", endpoints=[url], options={"num_predict": 5},
                      job="from-a-thread", plan=plan).total_tokens


@gen_cluster(client=True, nthreads=[], config=FAST)
async def test_model_call_beside_an_asynchronous_client_uses_the_cluster_budgets(c, s):
    # From a thread, an asynchronous client serves blocking calls (Client.asynchronous is
    # False off its loop): the call reserves on the cluster, not in a process-local ledger.
    await B.set_budget(c, "plan-p", 10**6, scope="plan", match="p")
    await B.set_budget(c, "none-left", 1, scope="plan", match="q", on_exhausted="fail")
    with OllamaTestServer(models=["m1"], token_latency=0.001) as srv:
        spent = await asyncio.to_thread(_call, srv.url)
        with pytest.raises(BudgetExceeded, match="none-left"):
            await asyncio.to_thread(_call, srv.url, "q")
        assert sum(srv.stats.tokens("m1")) == spent > 0
    frame = await B.budgets(c)
    assert frame.loc["plan-p", "calls"] == 1 and frame.loc["plan-p", "used"] == spent
    assert frame.loc["plan-p", "reserved"] == 0
    assert B.budgets().empty  # nothing went to the process-local ledger


@gen_cluster(client=True, nthreads=[], config=FAST)
async def test_model_call_on_the_clients_event_loop_says_to_use_a_thread(c, s):
    # Regression: on the loop it fell back to the process-local ledger, ignoring the
    # cluster's budgets without a word (it could not wait for the scheduler there).
    with OllamaTestServer(models=["m1"]) as srv:
        with pytest.raises(ModelError, match=r"asyncio\.to_thread"):
            _call(srv.url)
        assert srv.stats.tokens("m1") == (0, 0)  # refused before the request


class LoopWatchFileSystem(MemoryFileSystem):
    """An in-memory fsspec filesystem that notes every call made on a running event loop."""

    protocol = "loopwatch"
    store: dict = {}
    pseudo_dirs = [""]
    on_loop: list[str] = []
    calls = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("loopwatch://"))


def _watch(name):
    method = getattr(MemoryFileSystem, name)

    def watched(self, *args, **kwargs):
        LoopWatchFileSystem.calls += 1
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            LoopWatchFileSystem.on_loop.append(f"{name}{args[:1]}")
        return method(self, *args, **kwargs)

    return watched


for _name in ("_open", "info", "ls", "find", "mkdir", "makedirs", "pipe_file", "cat_file",
              "rm", "_rm", "rmdir", "cp_file", "isfile", "modified", "created"):
    setattr(LoopWatchFileSystem, _name, _watch(_name))
fsspec.register_implementation("loopwatch", LoopWatchFileSystem, clobber=True)


@pytest.fixture
def loopwatch():
    LoopWatchFileSystem.store.clear()
    LoopWatchFileSystem.on_loop.clear()
    LoopWatchFileSystem.calls = 0
    yield LoopWatchFileSystem
    LoopWatchFileSystem.store.clear()


def test_the_watch_sees_io_on_a_running_loop(loopwatch):
    fs = fsspec.filesystem("loopwatch")

    async def on_the_loop():
        fs.pipe_file("loopwatch://x/y", b"1")

    asyncio.run(on_the_loop())
    fs.cat_file("loopwatch://x/y")  # no loop here: not noted
    assert loopwatch.on_loop[0] == "pipe_file('loopwatch://x/y',)"
    assert not any(call.startswith("cat_file") for call in loopwatch.on_loop)


def test_obdask_run_with_an_asynchronous_client_does_no_store_io_on_the_loop(loopwatch):
    folder = Path(tempfile.mkdtemp())
    (folder / "plan.md").write_text("plan_id=watched\n"
                                    "- [ ] id=a lane=1 payload=@cmd:echo hi\n"
                                    "- [ ] id=b lane=1 deps=a payload=@cmd:true\n"
                                    "- [ ] id=c lane=1 payload=@doc:metadata only\n")

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)])
    async def run(c, s, a):
        for resume in (False, True):  # the second run reads the first one's ledger
            result = await obdask.run(Plan.from_file(folder / "plan.md"), c, resume=resume,
                                      artifacts="loopwatch://art", records="loopwatch://rec")
            assert result.ok and result.location.startswith("loopwatch://rec/watched/")

    run()
    assert loopwatch.calls > 20  # prepare, the lock, the ledger, artifacts and records
    assert any(path.startswith("/rec/watched/") for path in loopwatch.store)
    assert loopwatch.on_loop == []
