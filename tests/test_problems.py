"""The paper's discovery problems: exact verifiers, hostile results, rewards, and programs run in
the confined sandbox."""
import json
import logging
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
def test_hostile_programs_score_zero(name, caplog):
    env = load_env("circle_packing:n=26", {"unsafe_local_exec": UNSAFE, "timeout_s": 4.0})
    program, why = HOSTILE[name]
    with caplog.at_level(logging.DEBUG, logger=P.__name__):
        state, reward, _ = safe_reward(env, "```python\n" + program + "```", timeout_s=30)
    assert (state, reward) == ("", 0.0)
    assert why in caplog.text


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
