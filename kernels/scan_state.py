"""The persistent scan workspace of the one-launch device-mask kernels (mask_scan_copy_kernel, and
mask_select_copy_kernel's ONE_LAUNCH): its layout, the tag of a launch, and the reset its last program does.

Programs of one launch talk through status words that carry the launch's tag, so words left by earlier launches
never match, and the workspace needs no memset launch and no host state per call (a CUDA graph replays it as
is). Layout, int64 words:

    [TICKET] next tile index to hand out   [DONE] programs finished          [GEN] launches run so far
    [HIGH] most status words any launch wrote   [STATUS + t] status word t, for t < HIGH (or this launch's)

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
STATUS = tl.constexpr(16)  # status words start 128 bytes in, apart from the counters every program hits

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

    Memory order (scope gpu): every program finishes its reads and writes of status words and counters before
    its acq_rel increment of DONE; the program that moves DONE to the grid size acquires them all (the increments
    form one release sequence), so its reset (TICKET and DONE to 0, HIGH, the wrap's zeroing, GEN + 1) happens
    after every other program's use of the old state. When GEN reaches the last tag of a period, the status words
    up to HIGH (every word ever written lies below it) are zeroed before the tags repeat."""
    done = tl.atomic_add(state_ptr + DONE, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        high = tl.maximum(tl.load(state_ptr + HIGH, volatile=True), words)
        tl.store(state_ptr + HIGH, high)
        if gen % TAG_PERIOD == TAG_PERIOD - 1:  # the next launch's tag was used before: zero the words
            for s in range(0, high, CLEAR_BLOCK):
                clear = s + tl.arange(0, CLEAR_BLOCK)
                tl.store(state_ptr + STATUS + clear, tl.zeros([CLEAR_BLOCK], tl.int64), mask=clear < high)
        tl.store(state_ptr + GEN, gen + 1)
        tl.store(state_ptr + TICKET, 0)
        tl.store(state_ptr + DONE, 0)
