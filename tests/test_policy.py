"""The redistribution policy: properties over any ledger, then scenarios an operator knows."""

import copy
import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from host_backend.policy import (
    GuestState,
    PolicyParams,
    Target,
    compute_targets,
    pressure_reason,
)
from protocol.errors import PolicyError

GiB = 1 << 18  # pages
MiB = 1 << 8

policy_settings = settings(
    deadline=None, derandomize=True, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)


# -- strategies --------------------------------------------------------------------------


@st.composite
def policy_params(draw):
    step = draw(st.integers(1, 300))
    headroom = draw(st.sampled_from([0.0, 0.1, 0.25, 0.5]))
    return PolicyParams(
        step_pages=step,
        threshold_pages=draw(st.integers(0, step)),
        idle_tax=draw(st.sampled_from([0.0, 0.5, 0.75, 0.95])),
        headroom=headroom,
        min_headroom_pages=draw(st.integers(0, 100)),
        pressure_psi=draw(st.floats(0, 100)),
        low_available_fraction=draw(st.floats(0, headroom / (1 + headroom) * 0.999)),
    )


@st.composite
def guest_states(draw, name, at_least_floor=False):
    ram = draw(st.integers(0, 2000))
    floor = draw(st.integers(0, ram))
    keep = draw(st.integers(floor if at_least_floor else 0, ram))
    stats = draw(st.booleans())
    reclaims = draw(st.booleans() | st.just(True))
    return GuestState(
        name=name,
        ram_pages=ram,
        min_pages=floor,
        shares=draw(st.integers(1, 2000)),
        keep_pages=keep,
        target_keep_pages=draw(st.none() | st.integers(0, ram)),
        used_pages=draw(st.integers(0, keep)) if stats else None,
        available_pages=draw(st.none() | st.integers(0, ram)) if stats else None,
        psi_some_avg10=draw(st.none() | st.floats(0, 100)) if stats else None,
        swapping=draw(st.booleans()) if stats else False,
        cannot_inflate=draw(st.booleans()),
        manual_keep_pages=draw(st.none() | st.none() | st.integers(0, 2500)),
        connected=draw(st.booleans() | st.just(True)),
        reclaims=reclaims,
        # Ballooned pages a punch did not free (or that refilled): few, when any.
        unfreed_pages=draw(st.just(0) | st.integers(0, min(50, ram - keep))) if reclaims else 0,
    )


@st.composite
def worlds(draw):
    n = draw(st.integers(1, 6))
    guests = [draw(guest_states(f"vm{i}")) for i in range(n)]
    capacity = draw(st.integers(0, sum(g.ram_pages for g in guests) + 500))
    return guests, capacity, draw(policy_params())


@st.composite
def tight_worlds(draw):
    """Guests within their floors, and a capacity between what the policy can never take
    back and what they hold now: there is a deficit, and it can be closed."""
    n = draw(st.integers(1, 6))
    guests = [draw(guest_states(f"vm{i}", at_least_floor=True)) for i in range(n)]
    least = immovable(guests)
    capacity = draw(st.integers(least, max(least, usage(guests))))
    return guests, capacity, draw(policy_params())


def automatic(g):
    return g.connected and g.manual_keep_pages is None and g.used_pages is not None


def manual_goal(g):
    return max(g.min_pages, min(g.ram_pages, g.manual_keep_pages))


def usage(guests):
    """What the guests hold of the host's capacity."""
    return sum(g.keep_pages + g.unfreed_pages if g.reclaims else g.ram_pages for g in guests)


def immovable(guests):
    """What the policy can never take back: floors, guests it cannot move, manual targets."""
    total = 0
    for g in guests:
        if not g.reclaims:
            total += g.ram_pages
            continue
        total += g.unfreed_pages  # nobody can be given what the host did not get back
        if g.connected and g.manual_keep_pages is not None:
            total += min(g.keep_pages, manual_goal(g))
        elif automatic(g):
            total += g.min_pages
        else:
            total += g.keep_pages
    return total


def comply(guests, targets):
    """Every connected guest reaches its target; statistics stay as they were."""
    return [
        dataclasses.replace(
            g, keep_pages=targets[g.name].keep_pages, target_keep_pages=targets[g.name].keep_pages,
            # a deflate may give back pages the host never freed
            unfreed_pages=min(g.unfreed_pages, g.ram_pages - targets[g.name].keep_pages),
        )
        if g.connected
        else g
        for g in guests
    ]


# -- properties --------------------------------------------------------------------------


@policy_settings
@given(worlds())
def test_targets_stay_within_floor_and_ram(world):
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)
    assert list(targets) == sorted(g.name for g in guests)
    for g in guests:
        t = targets[g.name]
        assert isinstance(t, Target) and t.reason
        assert g.min_pages <= t.keep_pages <= g.ram_pages
        assert g.min_pages <= t.goal_pages <= g.ram_pages


@policy_settings
@given(worlds())
def test_no_target_moves_more_than_a_step(world):
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)
    for g in guests:
        new = targets[g.name].keep_pages
        if g.keep_pages < g.min_pages:  # the floor is a guarantee, not a goal: straight back
            assert new == g.min_pages
        else:
            assert abs(new - g.keep_pages) <= params.step_pages


@policy_settings
@given(worlds())
def test_changes_below_threshold_are_not_made(world):
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)
    for g in guests:
        new = targets[g.name].keep_pages
        exact = {g.min_pages, g.ram_pages}  # bounds and an operator's figure are hit exactly
        if g.manual_keep_pages is not None:
            exact.add(manual_goal(g))
        assert (
            new == g.keep_pages
            or abs(new - g.keep_pages) >= params.threshold_pages
            or (new in exact)
        )


@policy_settings
@given(worlds())
def test_disconnected_and_silent_guests_stay_where_they_are(world):
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)
    for g in guests:
        pinned = not g.connected or (g.used_pages is None and g.manual_keep_pages is None)
        if pinned:
            assert targets[g.name].keep_pages == max(g.keep_pages, g.min_pages)


@policy_settings
@given(worlds())
def test_pressured_guest_is_not_inflated_while_an_idle_guest_has_memory(world):
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)
    pressured = [g for g in guests if automatic(g) and pressure_reason(g, params)]
    idle_with_spare = [
        g
        for g in guests
        if automatic(g)
        and g.reclaims
        and not pressure_reason(g, params)
        and targets[g.name].keep_pages > g.min_pages
    ]
    for g in pressured:
        inflated = targets[g.name].keep_pages < g.keep_pages
        if not g.reclaims:  # its balloon frees nothing, so there is never a reason
            assert not inflated
        elif idle_with_spare:
            assert not inflated, (g.name, [i.name for i in idle_with_spare])


@policy_settings
@given(worlds())
def test_deterministic_and_does_not_touch_its_input(world):
    guests, capacity, params = world
    before = copy.deepcopy(guests)
    first = compute_targets(guests, capacity, params)
    assert guests == before
    assert compute_targets(list(reversed(guests)), capacity, params) == first
    assert compute_targets(iter(guests), capacity, params) == first


@policy_settings
@given(tight_worlds())
def test_compliant_guests_fit_the_capacity_within_deficit_over_step_rounds(world):
    guests, capacity, params = world
    deficit = max(0, usage(guests) - capacity)
    rounds = math.ceil(deficit / params.step_pages)
    for _ in range(rounds):
        guests = comply(guests, compute_targets(guests, capacity, params))
    assert usage(guests) <= capacity, f"still over after {rounds} rounds"
    for _ in range(5):  # and once within, it stays within
        guests = comply(guests, compute_targets(guests, capacity, params))
        assert usage(guests) <= capacity


@policy_settings
@given(worlds())
def test_growth_is_paid_from_free_capacity_only(world):
    """No round's targets promise more than the capacity, unless the guests already held
    more (then only shrinks and floors are sent)."""
    guests, capacity, params = world
    targets = compute_targets(guests, capacity, params)

    def held(g, keep):
        if not g.reclaims:
            return g.ram_pages
        granted = g.target_keep_pages if g.connected and g.target_keep_pages is not None else 0
        return max(keep, granted) + g.unfreed_pages

    now = sum(held(g, g.keep_pages) for g in guests)
    promised = sum(held(g, max(g.keep_pages, targets[g.name].keep_pages)) for g in guests)
    floors_restored = sum(
        g.min_pages - g.keep_pages for g in guests if g.reclaims and g.keep_pages < g.min_pages
    )
    assert promised - floors_restored <= max(now, capacity)


# -- scenarios ---------------------------------------------------------------------------


def guest(name, **kw):
    base = dict(
        name=name,
        ram_pages=4 * GiB,
        min_pages=GiB // 2,
        shares=1000,
        keep_pages=2 * GiB,
        used_pages=GiB,
        available_pages=GiB,
    )
    return GuestState(**(base | kw))


def observe(g, workload_pages):
    """A guest's statistics as its kernel would report them for a workload of this size:
    it uses what fits (the kernel keeps 5% free) and swaps the rest."""
    used = min(workload_pages, int(g.keep_pages * 0.95))
    short = workload_pages > used
    return dataclasses.replace(
        g,
        used_pages=used,
        available_pages=g.keep_pages - used,
        total_pages=g.keep_pages,
        psi_some_avg10=40.0 if short else 0.0,
        swapping=short,
    )


def test_memory_moves_to_the_guest_that_starts_a_workload():
    params = PolicyParams()
    capacity = 7 * GiB
    workload = {"busy": GiB, "idle1": GiB, "idle2": GiB}
    guests = [guest(name) for name in sorted(workload)]

    def run_round(guests):
        guests = [observe(g, workload[g.name]) for g in guests]
        targets = compute_targets(guests, capacity, params)
        guests = comply(guests, targets)
        assert usage(guests) <= capacity
        return guests, targets

    for _ in range(30):  # settle: the spare is shared out
        guests, targets = run_round(guests)
    start = {g.name: g.keep_pages for g in guests}
    assert max(start.values()) - min(start.values()) <= 1  # equal shares, to the page
    assert min(start.values()) > 2 * GiB

    ramp = 8  # the workload climbs to 3 GiB over 8 rounds
    need = math.ceil(3 * GiB * (1 + params.headroom))  # its working set with headroom
    bound = ramp + math.ceil((need - start["busy"]) / params.step_pages) + 2
    served_at = None
    for r in range(1, 60):
        workload["busy"] = min(3 * GiB, GiB + r * (GiB // 4))
        guests, targets = run_round(guests)
        by_name = {g.name: g for g in guests}
        for name in ("idle1", "idle2"):
            idle = by_name[name]
            working_set = idle.used_pages + max(
                math.ceil(params.headroom * idle.used_pages), params.min_headroom_pages
            )
            assert idle.keep_pages >= max(idle.min_pages, working_set), (r, name)
        busy = by_name["busy"]
        if served_at is None and busy.keep_pages >= need and not pressure_reason(busy, params):
            served_at = r
    print(
        f"\nbusy guest served after {served_at} rounds (bound {bound}); "
        f"final keeps {[(g.name, round(g.keep_pages / GiB, 2)) for g in guests]}"
    )
    assert served_at is not None and served_at <= bound
    # and then it holds still: no guest keeps being pushed back and forth
    assert all(t.keep_pages == by_name[name].keep_pages for name, t in targets.items())
    again, _ = run_round(guests)
    assert again == guests


def test_pressured_guest_is_served_first_and_idle_memory_is_taxed():
    params = PolicyParams()
    hot = guest(
        "hot",
        keep_pages=GiB,
        used_pages=GiB - 10 * MiB,
        available_pages=10 * MiB,
        psi_some_avg10=60.0,
    )
    small = guest("small", keep_pages=3 * GiB, used_pages=GiB // 4, available_pages=2 * GiB)
    large = guest("large", keep_pages=3 * GiB, used_pages=2 * GiB, available_pages=GiB)
    targets = compute_targets([hot, small, large], 7 * GiB, params)
    assert targets["hot"].reason == "pressure: psi 60%, waiting for capacity"
    assert targets["hot"].goal_pages == GiB + params.step_pages
    # The spare left after working sets goes mostly to the guest whose working set is small
    # for its shares (ESX: a page beyond the working set costs 1 / (1 - tax)).
    spare = {
        g.name: targets[g.name].goal_pages - (g.used_pages + math.ceil(0.25 * g.used_pages))
        for g in (small, large)
    }
    assert spare["small"] > spare["large"] >= 0
    # Capacity is all held, so the hot guest waits a round while the others give memory.
    assert targets["small"].keep_pages == small.keep_pages - params.step_pages
    nxt = compute_targets(comply([hot, small, large], targets), 7 * GiB, params)
    assert nxt["hot"].keep_pages == GiB + params.step_pages


def test_pages_the_host_did_not_free_are_not_handed_out():
    # The idle guest's balloon holds 256 MiB the host could not free (a punch left data):
    # the host holds exactly what the guests cost, so the pressured guest gets nothing
    # until the idle one gives memory the host really gets back.
    busy = guest("busy", keep_pages=2 * GiB, used_pages=2 * GiB - 10 * MiB,
                 available_pages=10 * MiB, psi_some_avg10=50.0, target_keep_pages=2 * GiB)
    idle = guest("idle", keep_pages=2 * GiB, used_pages=GiB // 2, available_pages=GiB,
                 target_keep_pages=2 * GiB, unfreed_pages=256 * MiB)
    capacity = 4 * GiB + 256 * MiB
    targets = compute_targets([busy, idle], capacity)
    assert targets["busy"].keep_pages == 2 * GiB
    assert "waiting for capacity" in targets["busy"].reason
    assert targets["idle"].keep_pages < 2 * GiB  # the idle guest is asked to give
    # Once it has given 100 MiB that the host freed, that (and only that) is handed out.
    idle = dataclasses.replace(idle, keep_pages=targets["idle"].keep_pages,
                               target_keep_pages=targets["idle"].keep_pages)
    freed_now = 2 * GiB - idle.keep_pages
    targets = compute_targets([busy, idle], capacity)
    assert 0 < targets["busy"].keep_pages - 2 * GiB <= freed_now


def test_growth_granted_is_not_taken_back_while_the_guest_is_slow():
    params = PolicyParams()
    hot = guest("hot", keep_pages=GiB, used_pages=GiB, available_pages=0)
    cold = guest("cold", keep_pages=2 * GiB, used_pages=GiB)
    capacity = 3 * GiB + params.step_pages
    first = compute_targets([hot, cold], capacity, params)
    assert first["hot"].keep_pages == GiB + params.step_pages  # from the free pool
    # the hot guest has not deflated yet: its grant stays, and nobody else gets it
    slow = [dataclasses.replace(hot, target_keep_pages=first["hot"].keep_pages), cold]
    second = compute_targets(slow, capacity, params)
    assert second["hot"].keep_pages == GiB + params.step_pages
    assert second["cold"].keep_pages <= cold.keep_pages


def test_manual_target_wins_clamped_stepped_and_paid_from_free_capacity():
    params = PolicyParams()
    a = guest("a", manual_keep_pages=GiB, psi_some_avg10=90.0)  # pressure does not matter
    b = guest("b")
    targets = compute_targets([a, b], 8 * GiB, params)
    assert targets["a"] == Target(2 * GiB - params.step_pages, GiB, "manual")

    # clamped to [floor, RAM]: above RAM means all of it, below the floor means the floor
    over = compute_targets([guest("a", manual_keep_pages=9 * GiB, keep_pages=4 * GiB)], 8 * GiB)
    assert over["a"].keep_pages == over["a"].goal_pages == 4 * GiB
    under = compute_targets([guest("a", manual_keep_pages=0, keep_pages=GiB // 2 + 5)], 8 * GiB)
    assert under["a"].keep_pages == GiB // 2  # exact, though 5 pages is under the threshold

    # growing needs free capacity: the other guest is asked to make room first
    big = guest("a", manual_keep_pages=4 * GiB, keep_pages=2 * GiB)
    full = guest("b", keep_pages=3 * GiB, used_pages=GiB // 2)
    guests, rounds = [big, full], 0
    while compute_targets(guests, 5 * GiB, params)["a"].keep_pages != 4 * GiB or rounds == 0:
        targets = compute_targets(guests, 5 * GiB, params)
        guests = comply(guests, targets)
        assert usage(guests) <= 5 * GiB
        rounds += 1
    assert rounds <= math.ceil(2 * GiB / params.step_pages) + 1
    assert guests[1].keep_pages == GiB  # b gave up what a asked for, never below its floor

    # a target set while the guest is away waits for it
    away = compute_targets([dataclasses.replace(a, connected=False)], 8 * GiB)
    assert away["a"].keep_pages == 2 * GiB and away["a"].reason == "disconnected"


def test_accounting_only_guest_counts_its_ram_and_makes_no_room():
    params = PolicyParams()
    box = guest("box", reclaims=False, keep_pages=4 * GiB, used_pages=GiB)
    working_set = GiB + GiB // 4  # used + 25% headroom
    vm = guest(
        "vm", keep_pages=GiB, used_pages=GiB - 10 * MiB, available_pages=10 * MiB, swapping=True
    )
    targets = compute_targets([box, vm], 5 * GiB, params)
    # The container is shrunk toward its working set (the idle tax) ...
    assert targets["box"].keep_pages == 4 * GiB - params.step_pages
    assert targets["box"].goal_pages == working_set
    assert targets["box"].reason == "accounting only, idle tax"
    # ... but its balloon frees nothing, so the swapping VM cannot grow into it.
    guests = [box, vm]
    for _ in range(40):
        targets = compute_targets(guests, 5 * GiB, params)
        guests = comply(guests, targets)
    assert guests[0].keep_pages == working_set
    assert guests[1].keep_pages == GiB
    assert targets["vm"].reason == "pressure: swapping, no room"

    # Under pressure it grows a step a round, capacity or not, and is never inflated.
    hot_box = dataclasses.replace(box, keep_pages=GiB, psi_some_avg10=50.0)
    t = compute_targets([hot_box], 0, params)["box"]
    assert t.keep_pages == GiB + params.step_pages
    assert t.reason == "accounting only, pressure: psi 50%"


def test_guest_without_statistics_is_left_alone():
    quiet = guest("quiet", used_pages=None, available_pages=None, keep_pages=3 * GiB)
    t = compute_targets([quiet, guest("other")], 4 * GiB)["quiet"]
    assert t == Target(3 * GiB, 3 * GiB, "no statistics")


def test_floors_that_do_not_fit_are_still_kept():
    a = guest("a", min_pages=3 * GiB, keep_pages=3 * GiB)
    b = guest("b", min_pages=3 * GiB, keep_pages=3 * GiB + 5)
    targets = compute_targets([a, b], 4 * GiB)
    assert targets["a"].keep_pages == 3 * GiB
    assert targets["b"].keep_pages == 3 * GiB
    assert targets["a"].reason == "over capacity"


def test_raised_floor_is_restored_at_once():
    g = guest("g", min_pages=3 * GiB, keep_pages=GiB)
    t = compute_targets([g], 8 * GiB)["g"]
    assert (t.keep_pages, t.reason) == (3 * GiB, "floor")  # not a step at a time


def test_small_deficit_still_closes():
    params = PolicyParams()
    a = guest("a", keep_pages=2 * GiB + 1)
    b = guest("b", keep_pages=2 * GiB)
    targets = compute_targets([a, b], 4 * GiB, params)
    assert sum(t.keep_pages for t in targets.values()) <= 4 * GiB


# -- what cannot hold --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(min_pages=5 * GiB), "min_pages"),
        (dict(shares=0), "shares"),
        (dict(ram_pages=-1, min_pages=0, keep_pages=0), "ram_pages"),
        (dict(keep_pages=-1), "keep_pages"),
        (dict(keep_pages=5 * GiB), "keep_pages"),
        (dict(used_pages=-3), "used_pages"),
        (dict(manual_keep_pages=-1), "manual_keep_pages"),
        (dict(target_keep_pages=5 * GiB), "target_keep_pages"),
        (dict(psi_some_avg10=float("nan")), "psi_some_avg10"),
        (dict(keep_pages=3 * GiB, unfreed_pages=GiB + 1), "unfreed_pages"),
        (dict(unfreed_pages=-1), "unfreed_pages"),
    ],
)
def test_impossible_guest_is_refused_by_name_and_field(change, field):
    with pytest.raises(PolicyError, match=rf"guest 'vm7': {field}"):
        guest("vm7", **change)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(step_pages=0), "step_pages"),
        (dict(threshold_pages=200 * MiB), "threshold_pages"),
        (dict(idle_tax=1.0), "idle_tax"),
        (dict(headroom=-0.1), "headroom"),
        (dict(pressure_psi=101.0), "pressure_psi"),
        (dict(low_available_fraction=0.3), "low_available_fraction"),
    ],
)
def test_impossible_params_are_refused_by_field(change, field):
    with pytest.raises(PolicyError, match=field):
        PolicyParams(**change)


def test_impossible_inputs_to_the_policy_are_refused():
    with pytest.raises(PolicyError, match="listed twice"):
        compute_targets([guest("a"), guest("a")], 8 * GiB)
    with pytest.raises(PolicyError, match="capacity_pages"):
        compute_targets([guest("a")], -1)
