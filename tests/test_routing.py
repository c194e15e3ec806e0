"""The pure routing step: hand-built trees, hand-set probabilities, no models."""

from __future__ import annotations

import numpy as np
import pytest

from hiernet.hierarchy import Hierarchy
from hiernet.routing import average_views, route, softmax

# root: angular, deep, other, round, solo (5 classes); 'solo' has one child; 'deep' goes 3 levels down;
# 'round' and 'other' both have a child named 'circle'
HIER = Hierarchy.from_leaf_paths(["angular/box", "angular/tri", "round/circle", "round/plus", "other/circle",
                                  "other/sq", "solo/only", "deep/upper/a", "deep/upper/b", "deep/lower"])


def table(hier: Hierarchy, rows: dict) -> dict:
    """node id → (n, C) array from per-node lists of {child name: prob} (one dict per image)."""
    out = {}
    for nid, per_image in rows.items():
        names = [hier.nodes[c].name for c in hier.nodes[nid].children]
        out[nid] = np.array([[d.get(name, 0.0) for name in names] for d in per_image])
    return out


def uniform_rest(n: int, **fixed) -> dict:
    return {nid: [fixed.get(nid, {})] * n for nid in HIER.classifier_nodes()}


def test_two_class_heads_take_the_most_likely_child_and_multiply_the_probabilities():
    probs = table(HIER, {"": [{"angular": 0.7, "round": 0.3}, {"round": 0.6, "deep": 0.4}],
                         "angular": [{"box": 0.2, "tri": 0.8}, {"box": 1.0}],
                         "round": [{"circle": 0.5, "plus": 0.5}, {"circle": 0.1, "plus": 0.9}],
                         "other": [{}, {}], "deep": [{}, {}], "deep/upper": [{}, {}]})
    a, b = route(HIER, probs, 2)
    assert a.node_ids == ["angular", "angular/tri"] and a.probs == [0.7, 0.8] and a.complete
    assert b.node_ids == ["round", "round/plus"] and b.probs == [0.6, 0.9]
    assert a.confidence == pytest.approx(0.56) and b.confidence == pytest.approx(0.54)
    assert a.node == "angular/tri"


def test_one_child_parent_passes_on_with_probability_one_and_needs_no_probabilities():
    probs = table(HIER, {"": [{"solo": 0.9, "round": 0.1}]})  # no entry for 'solo' at all
    (r,) = route(HIER, probs, 1, topk=3)
    assert r.node_ids == ["solo", "solo/only"] and r.probs == [0.9, 1.0]
    assert r.topk[1] == [("solo/only", 1.0)] and r.complete and r.confidence == pytest.approx(0.9)


def test_three_levels_and_the_callable_sees_exactly_the_images_routed_to_each_node():
    probs = table(HIER, {"": [{"deep": 0.9}, {"deep": 0.8}, {"round": 1.0}],
                         "deep": [{"upper": 0.6, "lower": 0.4}, {"lower": 0.7, "upper": 0.3}, {}],
                         "deep/upper": [{"a": 0.1, "b": 0.9}, {}, {}],
                         "round": [{}, {}, {"plus": 1.0}]})
    calls = []

    def lazy(nid, idx):
        calls.append((nid, list(idx)))
        return probs[nid][idx]

    routes = route(HIER, lazy, 3)
    assert [r.node_ids for r in routes] == [["deep", "deep/upper", "deep/upper/b"], ["deep", "deep/lower"],
                                            ["round", "round/plus"]]
    assert routes[0].confidence == pytest.approx(0.9 * 0.6 * 0.9)
    assert sorted(calls) == [("", [0, 1, 2]), ("deep", [0, 1]), ("deep/upper", [0]), ("round", [2])]
    assert [r.node_ids for r in route(HIER, probs, 3)] == [r.node_ids for r in routes]  # array form agrees


@pytest.mark.parametrize("threshold, expected, confidence", [
    (0.0, ["deep", "deep/upper", "deep/upper/a"], 0.75 * 0.625 * 0.75),
    (0.4, ["deep", "deep/upper"], 0.46875),  # the leaf would bring the path to 0.35: stop at its parent
    (0.46875, ["deep", "deep/upper"], 0.46875),  # a path probability equal to the threshold qualifies (exact in binary)
    (0.5, ["deep"], 0.75),
    (0.8, [], 1.0),  # not even the top level qualifies
])
def test_min_confidence_stops_at_the_deepest_qualifying_node(threshold, expected, confidence):
    probs = table(HIER, {"": [{"deep": 0.75, "round": 0.25}], "deep": [{"upper": 0.625, "lower": 0.375}],
                         "deep/upper": [{"a": 0.75, "b": 0.25}]})
    (r,) = route(HIER, probs, 1, min_confidence=threshold)
    assert r.node_ids == expected and len(r.probs) == len(r.topk) == len(expected)
    assert r.complete == (threshold == 0.0)
    assert r.confidence == pytest.approx(confidence)
    assert r.node == (expected[-1] if expected else "")


def test_topk_lists_children_most_likely_first_and_at_most_c():
    probs = table(HIER, {"": [{"angular": 0.1, "deep": 0.3, "other": 0.05, "round": 0.5, "solo": 0.05}],
                         "round": [{"circle": 0.25, "plus": 0.75}]})
    (r,) = route(HIER, probs, 1, topk=3)
    assert r.topk[0] == [("round", 0.5), ("deep", 0.3), ("angular", 0.1)]
    (r,) = route(HIER, probs, 1, topk=10)
    assert [c for c, _ in r.topk[0][:3]] == ["round", "deep", "angular"]
    assert {c for c, _ in r.topk[0][3:]} == {"other", "solo"}  # a tie: either order
    assert len(r.topk[0]) == 5 and len(r.topk[1]) == 2 and r.topk[1][0] == ("round/plus", 0.75)
    (r,) = route(HIER, probs, 1)  # default: only the chosen class
    assert r.topk == [[("round", 0.5)], [("round/plus", 0.75)]]


def test_children_with_the_same_name_under_two_parents_stay_apart():
    probs = table(HIER, {"": [{"round": 1.0}, {"other": 1.0}],
                         "round": [{"circle": 0.9, "plus": 0.1}, {}], "other": [{}, {"circle": 0.6, "sq": 0.4}]})
    a, b = route(HIER, probs, 2)
    assert a.node_ids == ["round", "round/circle"] and b.node_ids == ["other", "other/circle"]


def test_wrongly_shaped_probabilities_are_refused():
    probs = {"": np.full((2, 3), 1 / 3)}  # the root has 5 children
    with pytest.raises(ValueError, match="expected"):
        route(HIER, probs, 2)


def test_no_images():
    assert route(HIER, {}, 0) == []


def test_softmax_and_mirror_average():
    z = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    p = softmax(z)  # stable for large logits
    np.testing.assert_allclose(p, [[0.5, 0.5], [0.25, 0.75]])
    np.testing.assert_allclose(average_views(p, p[::-1]), [[0.375, 0.625], [0.375, 0.625]])


# ------------------------------------------------------------------ routes from a leaf distribution
# root: a (two leaves), b (one leaf): the most likely leaf can sit below the less likely parent
SMALL = Hierarchy.from_leaf_paths(["a/x", "a/y", "b/z"])


def test_route_leaves_takes_the_most_likely_leaf_even_below_the_lighter_parent():
    from hiernet.routing import route_leaves

    (r,) = route_leaves(SMALL, np.array([[0.3, 0.3, 0.4]]), ["a/x", "a/y", "b/z"], topk=2)
    assert r.node_ids == ["b", "b/z"] and r.complete  # a greedy walk by mass would go to 'a' (0.6)
    assert r.probs == pytest.approx([0.4, 1.0]) and r.confidence == pytest.approx(0.4)
    assert [c for c, _ in r.topk[0]] == ["a", "b"] and r.topk[0][0][1] == pytest.approx(0.6)
    # a two-class head's level: the chosen child's share of its parent's mass; unnormalised rows and any
    # column order
    (r,) = route_leaves(SMALL, np.array([[4.0, 1.0, 5.0]]) / 2, ["b/z", "a/y", "a/x"])
    assert r.node_ids == ["a", "a/x"] and r.probs == pytest.approx([0.6, 5 / 6])
    assert r.confidence == pytest.approx(0.5) and r.topk == [[("a", pytest.approx(0.6))], [("a/x", pytest.approx(5 / 6))]]


def test_route_leaves_stops_where_the_path_mass_falls_below_the_minimum():
    from hiernet.routing import route_leaves

    stop, go = route_leaves(SMALL, np.array([[0.3, 0.3, 0.4], [0.1, 0.2, 0.7]]), ["a/x", "a/y", "b/z"],
                            min_confidence=0.5)
    assert stop.node_ids == [] and not stop.complete and stop.node == ""
    assert [c for c, _ in stop.candidates] == ["a", "b"]
    assert go.node_ids == ["b", "b/z"] and go.complete
    with pytest.raises(ValueError, match="leaves"):
        route_leaves(SMALL, np.ones((1, 2)), ["a/x", "a/y"])


def test_path_leaf_probs_multiply_along_the_path_and_one_child_parents_pass():
    from hiernet.routing import path_leaf_probs

    probs = {"": np.array([[0.6, 0.4]]), "a": np.array([[0.25, 0.75]])}
    assert path_leaf_probs(SMALL, probs, ["a/x", "a/y", "b/z"]) == pytest.approx(np.array([[0.15, 0.45, 0.4]]))
