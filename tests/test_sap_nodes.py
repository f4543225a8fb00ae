"""sap_nodes: naming, detection in the main graph and in If/Loop bodies, attribute edits."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from models import dense_with, single, with_if, with_loop

from onnx_sap.api import harden
from onnx_sap.sap_nodes import (find_sap_nodes, has_sap, is_custom, iter_graphs, iter_nodes, node_attributes,
                                node_name, parse_name, region_name, with_deterministic_sap, with_seed)


def test_names_round_trip_and_other_names_are_not_sap():
    name = node_name(region_name("portable", 7), "x_over_q")
    assert name == "onnx_sap::portable/7#x_over_q"
    parsed = parse_name(name)
    assert (parsed.region, parsed.index, parsed.role, parsed.key) == ("portable", "7", "x_over_q",
                                                                      "onnx_sap::portable/7")
    assert parse_name(region_name("sap", 3)).role == ""
    for other in ("relu", "onnx_sap::", "onnx_sap::unknown/1#out", "my_onnx_sap::sap/1"):
        assert parse_name(other) is None


def test_detection_reaches_if_and_loop_bodies_on_protos_and_graphsurgeon_graphs():
    for build in (with_if, with_loop):
        hardened = harden(build(), check=False).model
        found = find_sap_nodes(hardened.graph)
        assert found and all(f.graph != "main" and f.form == "custom" for f in found)
        assert [f.to_dict() for f in find_sap_nodes(gs.import_onnx(hardened))] == [f.to_dict() for f in found]
        assert has_sap(hardened) and not has_sap(build())


def test_walker_paths_name_the_body():
    paths = [p for p, _ in iter_graphs(with_if().graph)]
    assert sorted(paths) == ["main", "main/choose.else_branch", "main/choose.then_branch"]


def test_portable_and_ensemble_regions_are_found_by_their_out_node():
    m = dense_with(single("Relu"))
    forms = [f.form for f in find_sap_nodes(harden(m, portable=True, check=False).model.graph)]
    assert forms == ["portable"]
    forms = sorted(f.form for f in find_sap_nodes(harden(m, ensemble=2, check=False).model.graph))
    assert forms == ["custom", "ensemble"]


def test_attribute_edits_reach_bodies_copy_and_keep_other_attributes():
    hardened = harden(with_if(), axis=1, mode="multinomial", check=False).model
    det = with_deterministic_sap(hardened)
    seeded = with_seed(hardened, 5)
    for model in (det, seeded):
        custom = [n for _, n in iter_nodes(model.graph) if is_custom(n)]
        assert len(custom) == 2
        for n in custom:
            a = node_attributes(n)
            assert a["axis"] == 1 and a["seed"] != 0 and "stream" in a
    assert all(node_attributes(n)["mode"] == "bernoulli" for _, n in iter_nodes(det.graph) if is_custom(n))
    seeds = [node_attributes(n)["seed"] for _, n in iter_nodes(seeded.graph) if is_custom(n)]
    assert len(set(seeds)) == 2  # every node its own stream
    assert all(node_attributes(n)["seed"] == 0 for _, n in iter_nodes(hardened.graph) if is_custom(n))


def test_portable_r_node_is_made_huge():
    hardened = harden(dense_with(single("Relu")), portable=True, mode="bernoulli", check=False).model
    det = with_deterministic_sap(hardened)
    r = next(n for _, n in iter_nodes(det.graph) if n.name.endswith("#r"))
    assert float(onnx.numpy_helper.to_array(r.attribute[0].t)) == 2.0**62
    assert isinstance(np.asarray(onnx.numpy_helper.to_array(r.attribute[0].t)).item(), float)
