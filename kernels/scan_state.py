"""The persistent scan workspace of the one-launch device-mask kernels (mask_scan_copy_kernel, and
mask_select_copy_kernel's ONE_LAUNCH): its layout, the tag of a launch, and the reset its last program does.

Programs of one launch talk through status words that carry the launch's tag, so words left by earlier launches
never match, and the workspace needs no memset launch and no host state per call (a CUDA graph replays it as
is). Layout, int64 words:

    [TICKET] next tile index to hand out   [DONE] slots whose programs all finished   [GEN] launches run so far
    [HIGH] most status words any launch wrote   [FINISHED + 16 s] programs of slot s finished (s < SLOTS)
    [STATUS + t] status word t, for t < HIGH (or this launch's)

A zeroed workspace is ready. The host (mmmerge_triton/workspaces.py) gives a workspace to one stream (or to one
captured launch), so launches on it never overlap: each starts after the previous one has finished. Every kernel
that uses it keeps the same rules: status words are ``tag << 32 | payload`` (payload < 2**32, tag as tag_of),
written with one 64-bit atomic exchange and read with volatile loads; each program ends with release_state.
"""
import triton
import triton.language as tl

# Workspace words (constexpr globals: a @jit function reads no other module globals).
TICKET = tl.constexpr(0)
DONE = tl.constexpr(1)
GEN = tl.constexpr(2)
HIGH = tl.constexpr(3)
SLOTS = tl.constexpr(64)  # program p counts its end in slot p % SLOTS (release_state)
FINISHED = tl.constexpr(16)  # slot counters, 128 bytes apart (one per L2 line), after the header's line
STATUS = tl.constexpr(16 + 16 * 64)  # status words after the slot counters

# tag = GEN % TAG_PERIOD + 1: never 0, so a zeroed word matches no launch; every field non-negative, so
# ``word >> 32`` is the tag.
TAG_PERIOD = tl.constexpr(2**31 - 1)
CLEAR_BLOCK = tl.constexpr(1024)  # status words zeroed per step when the tags wrap


@triton.jit
def tag_of(gen):
    """This launch's tag, shifted into place (``tag << 32``), from the GEN word it read at its start."""
    return (gen % TAG_PERIOD + 1) << 32


@triton.jit
def release_state(state_ptr, gen, words):
    """A program's last act on the workspace; the last program of the launch resets it for the next launch.
    ``gen``: the GEN it read at its start; ``words``: status words this launch may have written (from STATUS).

    Program p adds one to its slot's counter (FINISHED, slot p % SLOTS); the last of a slot's programs zeroes
    that counter and adds one to DONE; the last slot's last program resets the workspace. With one counter for
    every program, the one-launch select took 3.5-5.4 ns more per program than its copy alone on an H100 (the
    adds to one word wait for one another: 1.6-2.0x a copy's time, bench/results/h100/2026-12-07-s16/);
    SLOTS counters, each on its own 128-byte line, spread the adds.

    Memory order (scope gpu): every program finishes its reads and writes of status words and counters before
    its acq_rel add to its slot; the slot's last program acquires them (the adds form one release sequence) and
    releases them with its add to DONE, which the last slot's last program acquires, so its reset (TICKET and DONE
    to 0, HIGH, the wrap's zeroing, GEN + 1) happens after every other program's use of the old state. When GEN
    reaches the last tag of a period, the status words up to HIGH (every word ever written lies below it) are
    zeroed before the tags repeat."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    slot = pid % SLOTS
    slot_programs = (programs - 1 - slot) // SLOTS + 1  # pid < programs, so at least one
    finished = tl.atomic_add(state_ptr + FINISHED + 16 * slot, 1, sem="acq_rel", scope="gpu")
    if finished == slot_programs - 1:
        tl.store(state_ptr + FINISHED + 16 * slot, 0)  # no other program of this launch adds to it again
        done = tl.atomic_add(state_ptr + DONE, 1, sem="acq_rel", scope="gpu")
        if done == tl.minimum(programs, SLOTS) - 1:
            high = tl.maximum(tl.load(state_ptr + HIGH, volatile=True), words)
            tl.store(state_ptr + HIGH, high)
            if gen % TAG_PERIOD == TAG_PERIOD - 1:  # the next launch's tag was used before: zero the words
                for s in range(0, high, CLEAR_BLOCK):
                    clear = s + tl.arange(0, CLEAR_BLOCK)
                    tl.store(state_ptr + STATUS + clear, tl.zeros([CLEAR_BLOCK], tl.int64), mask=clear < high)
            tl.store(state_ptr + GEN, gen + 1)
            tl.store(state_ptr + TICKET, 0)
            tl.store(state_ptr + DONE, 0)
