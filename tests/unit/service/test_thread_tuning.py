"""A GPU process's threads as the operating system sees them: named (so `top -H` tells them apart) and, for the
prefetch and store threads, scheduled below the model thread. Every change is made in a thread of its own (or a
child process), so the test process keeps its own name and priority."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from worker.ops.supervise import BACKGROUND_NICENESS, lower_thread_priority, name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread names and niceness: Linux")


def in_thread(work):
    """`work()` run in a fresh thread; its result, or its exception raised here."""
    outcome = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def os_name(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().rstrip("\n")


def niceness(tid: int) -> int:
    """Field 19 of the thread's /proc stat line (its nice value), as `ps -L -o nice` shows it."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])


def test_a_thread_names_itself_for_the_os_and_its_threads_inherit_the_name():
    main = threading.get_native_id()
    main_name = os_name(main)

    def work():
        tid = threading.get_native_id()
        name_os_thread("item-prefetch-and-more")  # longer than Linux keeps
        return tid, os_name(tid), in_thread(lambda: os_name(threading.get_native_id()))

    tid, after, child = in_thread(work)
    assert tid != main
    assert after == "item-prefetch-a"  # its first 15 bytes
    assert child == after  # a thread it starts inherits it
    assert os_name(main) == main_name


def test_a_background_thread_is_scheduled_below_the_process_and_so_are_its_threads():
    main = threading.get_native_id()
    if niceness(main) != 0 or os.getpriority(os.PRIO_PROCESS, os.getpid()) != 0:
        pytest.skip("the tests run below the default priority")

    def work():
        tid = threading.get_native_id()
        before = niceness(tid)
        lower_thread_priority(3)
        after = (niceness(tid), os.getpriority(os.PRIO_PROCESS, tid))
        return before, after, in_thread(lambda: niceness(threading.get_native_id()))

    before, (after, reported), child = in_thread(work)
    assert before == 0 and after == reported == 3
    assert child == 3  # the threads it starts (a prefetch thread's readers) inherit it
    assert niceness(main) == 0  # the model thread keeps its place
    assert BACKGROUND_NICENESS > 0
    assert in_thread(lambda: (lower_thread_priority(), niceness(threading.get_native_id()))[1]) == BACKGROUND_NICENESS


LOWERED_IN_A_NICE_PROCESS = textwrap.dedent(
    """
    import os, threading
    from worker.ops.supervise import lower_thread_priority
    os.nice({process})
    seen = []
    def lowered():
        lower_thread_priority(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    print(os.getpriority(os.PRIO_PROCESS, os.getpid()), seen[0])
    """
)


@pytest.mark.parametrize("process", [3, 10])
def test_background_threads_are_lowered_relative_to_a_niced_process(process):
    code = LOWERED_IN_A_NICE_PROCESS.format(process=process)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    main, lowered = map(int, result.stdout.split())
    assert main == process
    assert lowered == min(19, process + 5)
