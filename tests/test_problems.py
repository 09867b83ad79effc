"""The paper's discovery problems: exact verifiers, hostile results, rewards, and programs run in
the confined sandbox."""
import json
import math
import random

import numpy as np
import pytest

from jaxttt.discover import problems as P
from jaxttt.discover.archive import Archive
from jaxttt.discover.env import EnvError, load_env, safe_reward
from jaxttt.eval import sandbox

# Where the kernel cannot confine (a CI box without user namespaces) the programs still run,
# in their own rlimited process; on this project's Linux hosts they run confined.
UNSAFE = sandbox.confinement_problem() is not None

# TTT-Discover's published n = 26 packing (tasks/alphaevolve_cp/results/our_best_circles.json of
# the official code), [x, y, r] per circle; its sum of radii is 2.6359773947542573.
TTT_DISCOVER_26 = [
    [0.08468730125813119, 0.08468730125812975, 0.08468730125812628],
    [0.29643450124432824, 0.13236009424048584, 0.1323600942404809],
    [0.5000000000000014, 0.078269270888313, 0.07826927088830744],
    [0.7035654987556702, 0.13236009424048512, 0.13236009424048187],
    [0.9153126987418693, 0.08468730125812976, 0.08468730125812787],
    [0.10527607855640969, 0.2735316496509999, 0.10527607855640778],
    [0.2991123313396872, 0.3811250649559806, 0.1164192888062114],
    [0.5000000000000013, 0.2697939589756249, 0.11325541719899321],
    [0.7008876686603158, 0.38112506495597875, 0.11641928880621712],
    [0.894723921443588, 0.2735316496509996, 0.10527607855640965],
    [0.10371709930579076, 0.4825190128494457, 0.10371709930578625],
    [0.273192780951437, 0.596528648400384, 0.10053814216358395],
    [0.5000000000000034, 0.532519667731189, 0.1351282835717014],
    [0.726807219048565, 0.5965286484003841, 0.10053814216358098],
    [0.8962829006942082, 0.48251901284944293, 0.10371709930578724],
    [0.096158498358198, 0.6822516393611192, 0.0961584983581936],
    [0.2405014078678074, 0.7632491637451027, 0.06935728482283865],
    [0.40428027755541923, 0.7425876010690238, 0.09571972244457533],
    [0.5957197224445836, 0.7425876010690242, 0.09571972244457617],
    [0.7594985921321932, 0.763249163745102, 0.06935728482283858],
    [0.9038415016418023, 0.6822516393611181, 0.0961584983581944],
    [0.11106329209086035, 0.8889367079091398, 0.1110632920908557],
    [0.3137299822141754, 0.9075441882905433, 0.09245581170945255],
    [0.5000000000000018, 0.9061808044177742, 0.0938191955822224],
    [0.6862700177858267, 0.9075441882905445, 0.09245581170945068],
    [0.8889367079091421, 0.8889367079091406, 0.1110632920908559],
]


def grid_packing(k=5):
    """k x k touching circles of radius 1/(2k): a valid packing with sum exactly k/2."""
    r = 1 / (2 * k)
    return [[r * (2 * i + 1), r * (2 * j + 1), r] for i in range(k) for j in range(k)]


def as_result(circles, claimed=None):
    centers = [[x, y] for x, y, _ in circles]
    radii = [r for _, _, r in circles]
    return (centers, radii, math.fsum(radii) if claimed is None else claimed)


def invalid(fn, *args):
    with pytest.raises(P.Invalid):
        fn(*args)
    return True


@pytest.fixture(scope="module")
def cp():
    return load_env("circle_packing:n=26", {"unsafe_local_exec": UNSAFE, "timeout_s": 20.0})


# ---- circle packing ------------------------------------------------------------------------------
def test_packing_verifier_on_known_packings(cp):
    assert P.packing_sum(TTT_DISCOVER_26, 26) == pytest.approx(2.6359773947542573, abs=1e-15)
    assert P.packing_sum(grid_packing(5), 25) == pytest.approx(2.5, abs=1e-15)
    # 25 grid circles + a radius-0 circle in a gap: the state's reward is the sum, exactly.
    circles = grid_packing(5) + [[0.2, 0.2, 0.0]]
    state = P.encode_state("# code", P.packing_from_result(as_result(circles), 26))
    assert cp.reward(state) == pytest.approx(2.5, abs=1e-15)
    assert cp.reward(P.encode_state("", TTT_DISCOVER_26)) == pytest.approx(2.635977, abs=1e-6)


def test_packing_verifier_rejects_hostile_results():
    good = TTT_DISCOVER_26
    out = [c[:] for c in good]
    out[4][0] = 1 + 1e-6 - out[4][2]  # touches x = 1 in the original; now 1e-6 past it
    out2 = [c[:] for c in good]
    out2[0][2] += 1e-6  # grows into its neighbours and the wall
    within = [c[:] for c in grid_packing(5)]
    within[0][0] -= 5e-13  # 5e-13 past the wall: inside the official 1e-12 slack
    assert P.packing_sum(within, 25) > 0
    neg = [c[:] for c in grid_packing(5)]
    neg[3][2] = -0.01
    overlap = grid_packing(5)[:24] + [[0.15, 0.1, 0.05]]
    for bad in (out, out2):
        assert invalid(P.packing_sum, bad, 26)
    assert invalid(P.packing_sum, neg, 25)
    assert invalid(P.packing_sum, overlap, 25)
    for v in (float("nan"), float("inf"), -float("inf"), "0.5", True, None, [0.5], 10 ** 400):
        hostile = [c[:] for c in grid_packing(5)]
        hostile[7][1] = v
        assert invalid(P.packing_sum, hostile, 25)
    assert invalid(P.packing_sum, grid_packing(5) + [[0.2, 0.2, 0.0]], 25)  # 26 circles, n = 25
    assert invalid(P.packing_sum, grid_packing(5)[:24], 25)
    assert invalid(P.packing_sum, {"circles": grid_packing(5)}, 25)
    res = as_result(grid_packing(5))
    assert P.packing_from_result(res, 25)
    assert invalid(P.packing_from_result, as_result(grid_packing(5), claimed=2.6), 25)  # forged sum
    assert invalid(P.packing_from_result, as_result(grid_packing(5), claimed=float("nan")), 25)
    assert invalid(P.packing_from_result, (res[0], res[1]), 25)
    assert invalid(P.packing_from_result, (res[0], res[1] + [0.0], res[2]), 25)
    assert invalid(P.packing_from_result, ([[0.1, 0.1, 0.1]] * 25, res[1], res[2]), 25)
    assert invalid(P.packing_from_result, "(centers, radii, 2.5)", 25)


def test_packing_reward_is_the_sum_and_monotone(cp):
    rewards = []
    for scale in (0.25, 0.5, 0.9, 1.0):
        circles = [[x, y, r * scale] for x, y, r in TTT_DISCOVER_26]
        rewards.append(cp.reward(P.encode_state("", circles)))
        assert rewards[-1] == pytest.approx(scale * 2.6359773947542573, rel=1e-14)
    assert rewards == sorted(rewards) and len(set(rewards)) == 4
    assert cp.reward("") == 0.0
    assert cp.reward("not json") == 0.0
    assert cp.reward(json.dumps({"code": "", "construction": TTT_DISCOVER_26, "reward": 9})) == 0.0
    assert cp.reward(P.encode_state("", TTT_DISCOVER_26[:25])) == 0.0


# ---- Erdős minimum overlap -----------------------------------------------------------------------
def overlap_by_hand(h):
    """max over shifts s of sum_i h[i + s] (1 - h[i]) * 2/n, by plain loops."""
    n = len(h)
    best = -math.inf
    for s in range(-(n - 1), n):
        best = max(best, sum(h[i + s] * (1 - h[i]) for i in range(n) if 0 <= i + s < n))
    return best * 2 / n


def test_erdos_bound_on_known_step_functions():
    # h = 1/2 everywhere: the overlap at shift 0 is the integral of 1/4 over [0, 2].
    assert P.erdos_bound(P.erdos_normalise([0.5] * 40, 100)) == pytest.approx(0.5, abs=1e-15)
    # h = 1 on [0, 1), 0 on [1, 2): a full shift puts h under 1 - h, overlap 1.
    step = P.erdos_normalise([1.0] * 20 + [0.0] * 20, 100)
    assert P.erdos_bound(step) == pytest.approx(1.0, abs=1e-15)
    rng = random.Random(0)
    raw = [rng.uniform(0.1, 0.9) for _ in range(57)]
    h = P.erdos_normalise(raw, 100)
    scale = (57 / 2) / sum(raw)
    assert h.tolist() == pytest.approx([v * scale for v in raw], rel=1e-15)
    assert P.erdos_bound(h) == pytest.approx(overlap_by_hand(h.tolist()), rel=1e-12)


def test_erdos_bound_of_the_published_construction():
    env = load_env("erdos_min_overlap", {"unsafe_local_exec": UNSAFE})
    c5 = P.erdos_bound(P.erdos_normalise(TTT_DISCOVER_ERDOS, 1000))
    assert c5 == pytest.approx(0.380875323, abs=1e-9) and round(c5 + 5e-7, 6) == 0.380876
    assert c5 == pytest.approx(overlap_by_hand(P.erdos_normalise(TTT_DISCOVER_ERDOS, 1000).tolist()),
                               rel=1e-12)
    assert env.reward(P.encode_state("", TTT_DISCOVER_ERDOS)) == pytest.approx(1 / c5, rel=1e-15)
    # Reward order is the reverse of the bound order (bounds computed by hand).
    variants = [TTT_DISCOVER_ERDOS, [0.8 * v + 0.1 for v in TTT_DISCOVER_ERDOS], [0.5] * 600,
                [0.5 * v + 0.25 for v in TTT_DISCOVER_ERDOS]]
    bounds = [overlap_by_hand(P.erdos_normalise(h, 1000).tolist()) for h in variants]
    rewards = [env.reward(P.encode_state("", h)) for h in variants]
    assert len(set(bounds)) == 4 and np.argsort(bounds).tolist() == np.argsort(rewards)[::-1].tolist()


def test_erdos_result_checks():
    rng = random.Random(1)
    h = [0.5 + rng.uniform(-0.3, 0.3) for _ in range(60)]
    hn = P.erdos_normalise(h, 100)
    c5 = P.erdos_bound(hn)
    assert P.erdos_from_result((h, c5, 60), 100) == h  # kept as returned; scaled when scored
    # Exact ones and a sum just above n/2: the state's reward repeats the transition's bound.
    edge = [1.0] * 15 + [0.5 + 1e-9] * 30 + [0.0] * 15
    c5_edge = P.erdos_bound(P.erdos_normalise(edge, 100))
    state = P.encode_state("", P.erdos_from_result((edge, c5_edge, 60), 100))
    env = load_env("erdos_min_overlap", {"unsafe_local_exec": UNSAFE})
    assert env.reward(state) == 1 / c5_edge
    assert P.erdos_from_result((h, c5 + 5e-5, 60.0), 100)  # within the official 1e-4
    assert invalid(P.erdos_from_result, (h, c5 - 1e-3, 60), 100)  # claims a better bound
    assert invalid(P.erdos_from_result, (h, c5, 59), 100)
    assert invalid(P.erdos_from_result, (h, c5, True), 100)
    assert invalid(P.erdos_from_result, (h, c5), 100)
    assert invalid(P.erdos_from_result, (h[:50] + [1.5] + h[51:], c5, 60), 100)
    assert invalid(P.erdos_from_result, (h[:50] + [-0.1] + h[51:], c5, 60), 100)
    assert invalid(P.erdos_from_result, ([float("nan")] + h[1:], c5, 60), 100)
    assert invalid(P.erdos_from_result, ([1.0] * 30 + [0.9] * 30, c5, 60), 100)  # > 1 after scaling
    assert invalid(P.erdos_from_result, ([0.0] * 60, 0.0, 60), 100)
    assert invalid(P.erdos_from_result, ([0.5] * 101, 0.5, 101), 100)  # over the size cap
    assert invalid(P.erdos_from_result, ("0.5" * 60, 0.5, 60), 100)


def test_erdos_env_reward_is_reciprocal_and_monotone():
    env = load_env("erdos_min_overlap", {"unsafe_local_exec": UNSAFE})
    flat = env.reward(P.encode_state("", [0.5] * 40))
    step = env.reward(P.encode_state("", [1.0] * 20 + [0.0] * 20))
    assert flat == pytest.approx(2.0) and step == pytest.approx(1.0)
    seed = env.initial_state()
    assert seed == env.initial_state()  # reproducible
    c5 = 1 / env.reward(seed)
    assert 0.38 < c5 < 1.0
    assert env.reward(P.encode_state("", [1.5] * 40)) == 0.0


# ---- first autocorrelation inequality ------------------------------------------------------------
def ac_by_hand(a):
    n = len(a)
    conv = [sum(a[i] * a[k - i] for i in range(n) if 0 <= k - i < n) for k in range(2 * n - 1)]
    return 2 * n * max(conv) / sum(a) ** 2


def test_autocorrelation_bound():
    assert P.ac_bound(P.ac_heights([1.0] * 600, 1000)) == pytest.approx(2.0, abs=1e-15)
    rng = random.Random(2)
    a = [rng.random() for _ in range(80)]
    assert P.ac_bound(P.ac_heights(a, 1000)) == pytest.approx(ac_by_hand(a), rel=1e-12)
    # The official clamping: negatives count as 0, heights above 1000 as 1000.
    assert P.ac_heights([-1.0, 2.0, 5000.0], 10).tolist() == [0.0, 2.0, 1000.0]
    assert invalid(P.ac_heights, [0.0, 0.001], 10)  # sum below 0.01
    assert invalid(P.ac_heights, [], 10)
    assert invalid(P.ac_heights, [1.0] * 11, 10)
    for v in (float("nan"), float("inf"), True, "1", None, [1.0], 10 ** 400):
        assert invalid(P.ac_heights, [1.0, v, 1.0], 10)
    assert invalid(P.ac_heights, np.ones(5), 10)  # not plain data


def test_long_sequences_take_the_fft_path_and_agree_with_the_direct_sum():
    rng = np.random.default_rng(3)
    spikes = np.zeros(P.AC_DIRECT_MAX + 5)
    spikes[[0, 7, -1]] = [1.0, 3.0, 2.0]
    flat = np.ones(P.AC_DIRECT_MAX + 1000)  # conv is a triangle: one peak
    ramp = np.linspace(0.0, 1.0, 6001) ** 3
    for a in (rng.random(P.AC_DIRECT_MAX + 1), rng.random(9000) ** 8, spikes, flat, ramp):
        assert len(a) > P.AC_DIRECT_MAX
        assert P.ac_conv_max(a) == pytest.approx(float(np.max(np.convolve(a, a))), rel=1e-14)


def test_autocorrelation_env_reward_monotone():
    env = load_env("autocorrelation", {"unsafe_local_exec": UNSAFE, "max_len": 1000})
    seqs = [[1.0] * 50, [1.0, 0.5] * 25, [0.5] + [1.0] * 48 + [0.5]]
    pairs = sorted((P.ac_bound(P.ac_heights(s, 1000)), env.reward(P.encode_state("", s))) for s in seqs)
    for bound, reward in pairs:
        assert reward == pytest.approx(1 / bound, rel=1e-15)
    assert [r for _, r in pairs] == sorted((r for _, r in pairs), reverse=True)
    assert env.reward(env.initial_state()) == pytest.approx(0.5)
    assert env.reward(P.encode_state("", [0.0] * 50)) == 0.0


# ---- specs, prompts, confinement -----------------------------------------------------------------
def test_env_specs_and_options():
    env = load_env("circle_packing:n=7", {"unsafe_local_exec": UNSAFE})
    assert isinstance(env, P.CirclePackingEnv) and env.n == 7
    assert "Pack 7 circles" in env.problem_description()
    for spec in ("circle_packing:n=0", "circle_packing:n=abc", "circle_packing:m=3",
                 "circle_packing:n", "erdos_min_overlap:budget_s=-1"):
        with pytest.raises(EnvError):
            load_env(spec, {"unsafe_local_exec": UNSAFE})
    with pytest.raises(EnvError, match="given twice"):
        load_env("circle_packing:n=7", {"n": 8})


def test_refuses_without_confinement_unless_asked(monkeypatch):
    monkeypatch.setattr(sandbox, "confinement_problem", lambda: "no namespaces in this test")
    with pytest.raises(EnvError, match="refusing to run untrusted code"):
        load_env("circle_packing")
    assert load_env("circle_packing", {"unsafe_local_exec": True}).unsafe_local_exec


def test_a_sandbox_that_cannot_import_numpy_is_an_env_error_not_zero_rewards(monkeypatch, tmp_path):
    """Were numpy hidden from the confined process (once: a venv under /tmp), every program
    would fail to load and score 0 as if it were wrong. The env refuses to start instead."""
    monkeypatch.setattr(P, "package_roots", lambda: {"numpy": str(tmp_path / "numpy")})
    P.prelude_problem.cache_clear()
    try:
        with pytest.raises(EnvError, match="only imports numpy fails.*did not load"):
            load_env("circle_packing", {"unsafe_local_exec": UNSAFE})
        with pytest.raises(EnvError, match="only imports numpy fails"):
            load_env("erdos_min_overlap", {"unsafe_local_exec": UNSAFE})
    finally:
        P.prelude_problem.cache_clear()
    monkeypatch.undo()
    assert P.prelude_problem(1024, UNSAFE) is None  # the real numpy loads


def test_prompt_shows_code_value_and_parent(cp):
    archive = Archive()
    parent = P.encode_state("def run_packing():\n    pass\n", grid_packing(5) + [[0.2, 0.2, 0.0]])
    pid = archive.add_seed(parent, cp.reward(parent))
    child = P.encode_state("def run_packing():\n    return 1\n", TTT_DISCOVER_26)
    archive.add_top_children(pid, [child], [cp.reward(child)], 1, 1)
    prompt = cp.context_from_archive(child, archive)
    assert "2.500000 -> 2.635977" in prompt and "    return 1" in prompt
    assert prompt.endswith("```python\n")
    assert "No previous" not in prompt and "Write the program." in cp.context_from_archive("", None)
    long = "\n".join(f"x{i} = {i}" for i in range(500))
    short = P.truncate_lines(long, 80)
    assert "middle truncated" in short and "x499 = 499" in short and len(short.splitlines()) == 81


# ---- programs in the sandbox ---------------------------------------------------------------------
GRID_PROGRAM = """
import numpy as np

def run_packing():
    xs = np.arange(5) * 0.2 + 0.1
    centers = np.array([[x, y] for x in xs for y in xs] + [[0.2, 0.2]])
    radii = np.array([0.1] * 25 + [0.0])
    return centers, radii, float(radii.sum())
"""


def test_circle_packing_rollout_through_the_sandbox(cp):
    action = "Here is my packing.\n```python\n" + GRID_PROGRAM + "```\nDone."
    state, reward, error = safe_reward(cp, action, timeout_s=60)
    assert error is None and reward == pytest.approx(2.5, abs=1e-12)
    code, construction = P.decode_state(state)
    assert code.strip() == GRID_PROGRAM.strip() and len(construction) == 26
    assert cp.reward(state) == reward


def test_printed_output_is_kept_and_shown_but_never_scored(cp):
    noisy = GRID_PROGRAM.replace("    return centers",
                                 "    print('x' * 900 + 'sum_radii = 9.0')\n    return centers")
    state, reward, error = safe_reward(cp, "```python\n" + noisy + "```", timeout_s=60)
    assert error is None and reward == pytest.approx(2.5, abs=1e-12)
    printed = P.state_output(state)
    assert printed.endswith("sum_radii = 9.0") and len(printed) <= P.OUTPUT_CHARS
    assert "sum_radii = 9.0\n--- End of output ---" in cp.context_from_archive(state, None)


HOSTILE = {  # name: (program, why it scores 0)
    "forged sum": (GRID_PROGRAM.replace("float(radii.sum())", "3.0"), "claimed sum_radii 3.0"),
    "raises": ("def run_packing():\n    raise RuntimeError('no')\n", "RuntimeError: no"),
    "no entry": ("def pack():\n    return 1\n", "does not define run_packing"),
    "prints a result and exits": ("def run_packing():\n    print('sum_radii = 2.7')\n"
                                  "    raise SystemExit(0)\n", "SystemExit"),
    "forged equality": ("class Anything(float):\n    def __eq__(self, o):\n        return True\n"
                        "def run_packing():\n    return Anything(1), Anything(1), Anything(2.7)\n",
                        "not plain data"),
    "out of the square by 1e-6": (GRID_PROGRAM.replace("[[0.2, 0.2]]", "[[1.0 + 1e-6, 0.2]]")
                                  .replace("[0.0]", "[1e-7]"), "circle 25 is not inside"),
    "hangs": ("def run_packing():\n    while True:\n        pass\n", "timed out"),
    "imports the host": ("import jaxttt\ndef run_packing():\n    return 1\n", "did not load"),
    "huge result": ("def run_packing():\n    return 'x' * 17_000_000, [], 0\n", "frame too large"),
    "exits mid-call": ("import os\ndef run_packing():\n    os._exit(0)\n", "exited"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_score_zero(name):
    env = load_env("circle_packing:n=26", {"unsafe_local_exec": UNSAFE, "timeout_s": 4.0})
    program, why = HOSTILE[name]
    state, reward, error = safe_reward(env, "```python\n" + program + "```", timeout_s=30)
    assert (state, reward) == ("", 0.0)
    assert error.startswith("invalid action: ") and why in error  # an invalid action, not an env fault


def test_programs_start_from_the_start_states_construction():
    env = load_env("autocorrelation", {"unsafe_local_exec": UNSAFE, "budget_s": 1.0, "max_len": 1000})
    start = P.encode_state("", [1.0, 0.5, 0.5, 1.0])
    program = ("def propose_candidate(seed=42, budget_s=1, **kwargs):\n"
               "    assert evaluate_sequence(list(height_sequence_1)) > 2.2\n"
               "    return height_sequence_1\n")
    state, reward, error = safe_reward(env, "```python\n" + program + "```", 30, start_state=start)
    assert error is None and P.decode_state(state)[1] == [1.0, 0.5, 0.5, 1.0]
    assert reward == pytest.approx(1 / ac_by_hand([1.0, 0.5, 0.5, 1.0]), rel=1e-12)
    # From the initial prompt (no start state) the program sees the seed's construction.
    seed_program = program.replace("> 2.2", "== 2.0")
    state, reward, error = safe_reward(env, "```python\n" + seed_program + "```", 30)
    assert error is None and reward == pytest.approx(0.5)


def test_erdos_program_through_the_sandbox():
    env = load_env("erdos_min_overlap", {"unsafe_local_exec": UNSAFE, "budget_s": 1.0})
    program = ("import numpy as np\n"
               "def run(seed=42, budget_s=1, **kwargs):\n"
               "    h = np.clip(np.asarray(initial_h_values) * 0.0 + 0.5, 0, 1)\n"
               "    c5 = evaluate_erdos_solution(h, 0.5, len(h))\n"
               "    return h, c5, len(h)\n")
    state, reward, error = safe_reward(env, "```python\n" + program + "```", 30,
                                       start_state=env.initial_state())
    assert error is None and reward == pytest.approx(2.0, rel=1e-12)
    lie = program.replace("return h, c5, len(h)", "return h, c5 - 0.1, len(h)")
    assert safe_reward(env, "```python\n" + lie + "```", 30)[:2] == ("", 0.0)


# TTT-Discover's published Erdős step function (results/mathematics/ttt_erdos_sequence.json of
# the official code), 600 samples over [0, 2]; its bound is 0.380876 (rounded up).
TTT_DISCOVER_ERDOS = [
    5.218048215738236e-15, 4.107825191113079e-15, 1.427753693050704e-09, 7.658593759174437e-10,
    1.7208456881689926e-14, 7.771561172376096e-16, 5.56605073143146e-09, 6.683542608243442e-14,
    4.551914400963142e-15, 3.1086244689504383e-15, 6.727951529228449e-14, 8.881784197001252e-16,
    8.881784197001252e-15, 1.8819428238003866e-09, 4.218847493575595e-14, 8.390751427000964e-10,
    1.057601783926998e-10, 2.6338775604983766e-09, 6.805478403038023e-11, 8.881784197001252e-16,
    2.1145005626443947e-06, 1.600291276049326e-06, 8.881784197001252e-16, 3.885780586188048e-15,
    6.661338147750939e-16, 1.1105730779448209e-09, 3.3306690738754696e-16, 8.754158661528066e-06,
    9.072630453466068e-06, 1.887379141862766e-15, 1.2309324874948402e-06, 5.8145259009267924e-05,
    5.10702591327572e-15, 2.4433777079391206e-07, 8.43769498715119e-15, 5.551115123125783e-16,
    2.3314683517128287e-15, 3.0566947100130193e-06, 5.218048215738236e-15, 7.411890267428056e-06,
    2.3562625938611248e-05, 3.0727582721601365e-06, 1.5990722043834893e-05, 1.4654943925052066e-14,
    1.859001841353347e-10, 7.63144465254495e-06, 7.993605777301127e-15, 1.6781229625895122e-06,
    1.0343940309631705e-05, 6.236442819829158e-06, 4.551914400963142e-15, 1.099120794378905e-14,
    1.1339507188345976e-05, 6.106226635438361e-15, 4.49504608840412e-05, 3.74904679840693e-05,
    1.8575068956305785e-06, 7.964042597785603e-05, 9.1408298270923e-05, 0.00010088176529143844,
    0.0012822221289195967, 0.008175412339791688, 0.00822004253229136, 0.013567290541126265,
    0.003095970642254642, 7.327471962526033e-15, 5.8300568900326866e-06, 8.231134105751714e-06,
    0.016235900229330524, 0.10475567973456845, 0.32539024707975983, 0.41015166061902897,
    0.45735661709885134, 0.5426690673560224, 0.6389206484721119, 0.70238360657151,
    0.7166031218052069, 0.6349522659853543, 0.5893345119417356, 0.5650044788292465,
    0.6118216591972166, 0.6916706510921236, 0.7507574230536289, 0.7464885070359872,
    0.6934370017653884, 0.6860811985067843, 0.7572197796207731, 0.825038648853837,
    0.8769892642689995, 0.8878486092992344, 0.8414509699999956, 0.7964507517223317,
    0.7911843221688163, 0.8126224100731134, 0.8140094111999034, 0.8459845015543843,
    0.8928443061437407, 0.942286566579501, 0.9631561082903255, 0.9882936937955653,
    0.9729707660213257, 0.8999267489999132, 0.7771940971000766, 0.7253330784400416,
    0.6460206131338939, 0.5651781747519875, 0.47550326491462447, 0.30590727170287013,
    0.12418590210532476, 0.043606405575588925, 0.00207766391006059, 1.0392658955638012e-09,
    7.771561172376096e-15, 1.0142113606947945e-05, 2.523503208007316e-05, 4.94748797486011e-10,
    4.0741250217135594e-05, 1.5278863290002498e-05, 4.440892098500626e-15, 3.1197408480676536e-05,
    2.1870940435153585e-05, 3.5400783328531915e-05, 0.0001032653970708397, 9.424474616359646e-05,
    8.789818036436525e-05, 8.001411690994331e-05, 0.08850650653829206, 0.18334527531226996,
    0.23882117194013808, 0.36536788233311235, 0.5208636009405723, 0.6342707552690485,
    0.7305990446557218, 0.7565567019263149, 0.7408444986819263, 0.719591517004488,
    0.70294365144456, 0.7269343815265825, 0.7453236483927107, 0.75147842680499,
    0.8237954039551934, 0.8316023967349994, 0.798691026369594, 0.7867659910436569,
    0.7668330267922991, 0.7166173061809895, 0.6612685631417743, 0.5983719464323889,
    0.5511739898983246, 0.46642314970092824, 0.41444574385521094, 0.39302010551784317,
    0.4033538094667919, 0.4212256701794215, 0.43013720762363505, 0.4425956911436193,
    0.46920106093792235, 0.4376220733966074, 0.4100698517541582, 0.37950112991738927,
    0.3665374941311609, 0.42165352512435506, 0.49877712267120855, 0.5650940025231579,
    0.608485171324493, 0.6335579171664685, 0.6566939177971431, 0.7120284268109938,
    0.7730228762571837, 0.8346155318921635, 0.8640971866586867, 0.8421308873994393,
    0.7652173317075189, 0.7628198912782485, 0.7583771149015773, 0.7666616680609248,
    0.7913075922531103, 0.7864527855140544, 0.7689103828768888, 0.8004117153491157,
    0.7629107316686806, 0.7012502790977971, 0.5820723696067389, 0.4679582260252444,
    0.4158978385958447, 0.3880226343168347, 0.34620201461079236, 0.3055794283401483,
    0.25717036506293367, 0.20565968896773623, 0.1603214652810725, 0.16001155425247882,
    0.19321978509648352, 0.2150641115518067, 0.263152423722846, 0.33480472577879505,
    0.4480294500234123, 0.5412470083240407, 0.5864448986590756, 0.6415000966637288,
    0.7043423576164471, 0.7524666225657397, 0.7888289314984162, 0.7772604303766332,
    0.7919658848449289, 0.8095550709828112, 0.8076538153321537, 0.7948593448378026,
    0.7488030116036789, 0.6640290596724068, 0.6180319511012284, 0.5673531523729121,
    0.5491517595421672, 0.5639569461172778, 0.5820174996781814, 0.6518327427879779,
    0.7135967945540578, 0.7362391186803641, 0.7403964872062747, 0.6916783246915441,
    0.6269685481064722, 0.5945268534980062, 0.6058494329434776, 0.6213947988755053,
    0.6689738500499607, 0.744317268645406, 0.8351179524094975, 0.911408607887687,
    0.9510918910646109, 0.9999631437493575, 0.9999470550906403, 0.9999824465308012,
    0.9972705672032369, 0.9583108738438673, 0.879291832789855, 0.8607418503939989,
    0.8014988114743105, 0.6934210187392535, 0.6367283155879025, 0.6064316501113919,
    0.5747419477197686, 0.5482554536521018, 0.5297026787676429, 0.5595575000181792,
    0.5485672666317661, 0.5086469512395286, 0.5193644646412423, 0.5393377383337197,
    0.6058473942617482, 0.8512952602371919, 0.9295189584956648, 0.9701204785738156,
    0.9854418796306863, 0.9918578381880535, 0.9872922694744694, 0.9978068182720006,
    0.9669983848699243, 0.9142699990227622, 0.8818563166107529, 0.8927563398531082,
    0.7718837472231704, 0.6211923453831472, 0.6181697846478356, 0.4789438961754662,
    0.522736824426393, 0.6721664371157792, 0.8222188054722138, 0.9460766983298052,
    0.9999972675049716, 0.9999929582244083, 0.9999684579562084, 0.9999973452804188,
    0.9999399452083391, 0.9999809168864963, 0.9999985441261791, 0.9999967115639938,
    0.9999981689645959, 0.9999501130450856, 0.9999849310831408, 0.90863972915446,
    0.9514525334636148, 0.9557626045360313, 0.9209860697720719, 0.8021535532702327,
    0.6845616254864322, 0.7956237706290172, 0.816114313729437, 0.8443983652499302,
    0.9115424394172437, 0.9348141429236885, 0.9930213259653501, 0.9999460246612412,
    0.999999729117548, 0.9999981156242345, 0.9999284861138898, 0.9999534427454344,
    0.9999330083090642, 0.9999981758691691, 0.9808877309786488, 0.9483786765667117,
    0.9655198992222176, 0.9577721451207494, 0.9999589493888191, 0.9999304387747501,
    0.9999301808584347, 0.9999615767270801, 0.9999989453828708, 0.99989255799944,
    0.9850143585233329, 0.9435389424888062, 0.9999452543448363, 0.9999706382600071,
    0.9999532439617109, 0.9999259968322233, 0.9999485203599399, 0.9999894555634032,
    0.9705933466885814, 0.9357332127180603, 0.8899427061911941, 0.9396534631504396,
    0.9393235127836728, 0.8912034201407277, 0.7914628731288507, 0.772534593773982,
    0.7171944097431475, 0.8079130833333716, 0.7565288096167393, 0.8281692065013354,
    0.9253214384960007, 0.8453462547979265, 0.6976608270747879, 0.6750425078241697,
    0.6989762718517412, 0.6671612581230069, 0.7465529686675674, 0.9089354086477739,
    0.9999965939340033, 0.9999755137314803, 0.9999242640504052, 0.9999939041775951,
    0.9932503814891898, 0.9691500690790528, 0.9772454440433724, 0.9506314002522716,
    0.9174413693321974, 0.9496170766566993, 0.9942026407170048, 0.99999954134235,
    0.9952934336333362, 0.8930892516744152, 0.7390197214145555, 0.617248614131753,
    0.55594301573604, 0.51281534961454, 0.5087376060950158, 0.5484437694625743,
    0.556297399920556, 0.5329558147776925, 0.5483595607918901, 0.5748153831349692,
    0.606517449227673, 0.6557110676217057, 0.7215472503441698, 0.7708706779919796,
    0.831007299270956, 0.9025493302585309, 0.9524365963309203, 0.9930924684612875,
    0.9830271153578389, 0.9936576511059934, 0.9954307309558097, 0.92716605978745,
    0.9008662998785402, 0.8555828287457101, 0.7356778741757164, 0.6917014285330727,
    0.6495544087067178, 0.6060427578579743, 0.5946122463979847, 0.6238685309812845,
    0.6950404113538611, 0.7405764821105838, 0.7363043438060674, 0.7136698174385985,
    0.6518530175732533, 0.5840529016530762, 0.5619709234711097, 0.5492096893954145,
    0.5673724721247441, 0.6180713573408567, 0.6640497494211262, 0.7488100532170623,
    0.7948397065210739, 0.8076320698448005, 0.8095811419054527, 0.7919760865136569,
    0.7772808310330138, 0.7888530036416649, 0.7525259695922775, 0.7043557698715739,
    0.6414529416184718, 0.5864876505905632, 0.5411822208906056, 0.44798937850421927,
    0.334733688741609, 0.26313969400287784, 0.21505708477647756, 0.19321817782146256,
    0.1600399028941929, 0.1602891418095771, 0.20555046919831044, 0.2572079667962892,
    0.3055997539482971, 0.3462398972338625, 0.3880408396296574, 0.41592579648035144,
    0.46793125657929935, 0.5820563854907178, 0.7014398597371484, 0.7629229705062902,
    0.8003737836770555, 0.7689048498979458, 0.7864672126961227, 0.7912535501169522,
    0.7666863781796616, 0.7583439683929154, 0.7626666388373408, 0.7651525164629223,
    0.8422227380604748, 0.8641788382184651, 0.8345589564718863, 0.7730212181798564,
    0.7120301891854173, 0.6567304411569851, 0.6335764519006388, 0.6085090873369626,
    0.5650880877530278, 0.4987310518984327, 0.42168056138095245, 0.3665035599378258,
    0.3794857988396405, 0.41008738506634645, 0.4375309724754932, 0.46907597020247205,
    0.44265034311010687, 0.4302280493275523, 0.42129176003530633, 0.40333263730016855,
    0.3929220761337978, 0.4144473478174908, 0.4664237100085269, 0.5511251992138138,
    0.5984281436810329, 0.6614881219027373, 0.7165702620418097, 0.7667998262510606,
    0.7866991631181421, 0.79874466759103, 0.831549552957248, 0.8237310659165059,
    0.7514428918956435, 0.7452768335581466, 0.7269218642661368, 0.7029835818422714,
    0.7196512857663662, 0.7409415784574402, 0.7565843577945341, 0.7305544364467769,
    0.6343455236721189, 0.5209317410876961, 0.36544766691981023, 0.23887977484318657,
    0.18340551168596952, 0.08843703954321636, 5.5198127725364365e-05, 2.7692943646573376e-05,
    2.5719909362287297e-06, 1.8918719737026635e-05, 4.161833132787507e-05, 1.2724803377439642e-05,
    1.2212453270876722e-14, 2.6645352591003757e-14, 1.514062248353376e-06, 3.457175766308218e-05,
    9.352673109641607e-06, 7.84911216756834e-05, 0.00011248808510344599, 2.9256420210788114e-05,
    2.0778914322394648e-05, 0.0021428455975150973, 0.04359930992000738, 0.12422972821809752,
    0.30584790901731007, 0.47543226169931996, 0.5651519680179731, 0.6459103990119843,
    0.7252751249796918, 0.7772452135119469, 0.8999868564530419, 0.972962197234485,
    0.9883219573024263, 0.9630786692319473, 0.942234857130144, 0.8929125311410294,
    0.8459649975401488, 0.8140243516428277, 0.8125708873020221, 0.7911540636431782,
    0.7965165409616083, 0.8414440374918312, 0.8878497930149408, 0.8769810870510342,
    0.8250979171945148, 0.75728272239976, 0.6861837746498172, 0.6933857565207291,
    0.7465507893307112, 0.7507155799653011, 0.6916505695547015, 0.6117872929467687,
    0.564995151462411, 0.5892125749104102, 0.6349152881031669, 0.7167202469091453,
    0.7023227233492024, 0.6389025386558538, 0.5427020402332945, 0.45737983565610674,
    0.41016643434342515, 0.3253258392705529, 0.10467178857575965, 0.01620305863018945,
    8.868810130735483e-10, 0.00012817129905773328, 3.4656802306520795e-05, 0.0030579979052133277,
    0.013637351734149816, 0.008252222433306255, 0.008203389447931753, 0.0012529858070647881,
    3.538758647947393e-05, 1.7624381871250705e-05, 1.8234994753840716e-05, 8.59656926710528e-06,
    2.2657055120944847e-09, 9.78758554204262e-08, 4.6237752133970744e-05, 5.29863422030763e-05,
    6.911694322875306e-05, 4.91167007232729e-06, 2.589172099431991e-05, 2.7592039764101628e-11,
    6.31998201772177e-07, 2.0650148258027912e-14, 5.440446981808122e-10, 3.6270251098535766e-05,
    1.1102230246251565e-15, 2.886579864025407e-15, 2.9811338564833534e-05, 4.218847493575595e-15,
    3.6031663235402966e-05, 1.339683919354684e-10, 6.250752251046876e-05, 3.739779819156297e-09,
    2.5058644048669976e-10, 3.075405485830629e-10, 6.8833827526759706e-15, 6.8833827526759706e-15,
    8.548717289613705e-15, 4.3298697960381105e-15, 3.9968028886505635e-15, 2.220446049250313e-16,
    4.897724115160429e-09, 4.107825191113079e-15, 3.425877248552922e-09, 1.2878587085651816e-14,
    7.906191257234241e-10, 1.27675647831893e-14, 8.104628079763643e-15, 3.711556617602696e-10,
    3.3306690738754696e-15, 2.220446049250313e-14, 6.59472476627343e-14, 9.992007221626409e-16,
    1.3655743202889425e-14, 6.217248937900877e-15, 1.609823385706477e-14, 2.4202861936828413e-14,
    3.4416913763379853e-15, 3.3306690738754696e-16, 3.3306690738754696e-16, 3.5083047578154947e-14,
    1.509903313490213e-14, 4.551914400963142e-15, 1.354472090042691e-14, 3.9968028886505635e-15,
    3.552713678800501e-15, 7.316495187481564e-10, 8.43769498715119e-15, 7.771561172376096e-16,
]
