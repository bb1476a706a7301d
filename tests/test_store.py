"""The frame store and the host pipeline: the same frames, labels, edge counts and batches as the sources."""

import json
import pickle

import jax
import jraph
import numpy as np
import pytest
from ase.units import GPa

from dpa4_jax import graph as graphs
from dpa4_jax.data import Frame, FrameError, fit_energy_bias, make_emt_dataset, read_frames, write_extxyz
from dpa4_jax.data.prepare import main as prepare_cli
from dpa4_jax.data.store import FrameStore, InMemoryFrames, prepare
from dpa4_jax.data.synthetic import write_synthetic_mptrj
from dpa4_jax.train.pipeline import BatchSpec, labelled_graph, load_batches
from dpa4_jax.train.start import energy_bias

CUTOFF = 4.0
TYPE_MAP = ("H", "O", "Al", "Ni", "Cu", "Au")


def write_deepmd(frame: Frame, folder):
    """One frame as a one-frame DeePMD system."""
    folder.mkdir(parents=True)
    symbols = sorted(set(frame.to_atoms().get_chemical_symbols()))
    types = [symbols.index(s) for s in frame.to_atoms().get_chemical_symbols()]
    (folder / "type.raw").write_text("\n".join(map(str, types)))
    (folder / "type_map.raw").write_text("\n".join(symbols))
    (folder / "set.000").mkdir()
    for name, value in dict(coord=frame.positions, box=frame.cell, energy=[frame.energy], force=frame.forces,
                            virial=frame.virial).items():
        np.save(folder / "set.000" / f"{name}.npy", np.reshape(value, (1, -1)))


def mptrj_record(frame: Frame) -> dict:
    """A frame in the MPtrj layout: pymatgen Structure dict, total energy, forces, stress in kBar (VASP sign)."""
    sites = [{"species": [{"element": s, "occu": 1}], "xyz": x.tolist()}
             for s, x in zip(frame.to_atoms().get_chemical_symbols(), frame.positions)]
    return {"structure": {"lattice": {"matrix": frame.cell.tolist()}, "sites": sites},
            "uncorrected_total_energy": frame.energy, "force": frame.forces.tolist(),
            "stress": (-10 * frame.stress / GPa).tolist()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """An extxyz file (with an unlabelled molecule), two DeePMD systems and an MPtrj JSON."""
    root = tmp_path_factory.mktemp("sources")
    emt = make_emt_dataset(14, seed=3)
    water = Frame(numbers=[8, 1, 1], positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], cell=np.zeros((3, 3)),
                  pbc=False)
    write_extxyz([*emt[:6], water], root / "a.extxyz")
    write_deepmd(emt[6], root / "deepmd" / "sys0")
    write_deepmd(emt[7], root / "deepmd" / "sys1")
    (root / "b.json").write_text(json.dumps({"mp-1": {f"mp-1-0-{i}": mptrj_record(f) for i, f in enumerate(emt[8:11])},
                                             "mp-2": {f"mp-2-0-{i}": mptrj_record(f) for i, f in enumerate(emt[11:])}}))
    return [root / "a.extxyz", root / "deepmd", root / "b.json"]


@pytest.fixture(scope="module")
def store(sources, tmp_path_factory):
    return prepare(sources, tmp_path_factory.mktemp("store") / "s", CUTOFF, workers=1, progress=False)


@pytest.fixture(scope="module")
def frames(sources):
    return [f for s in sources for f in read_frames(s)]


def test_store_gives_the_frames_and_labels_of_every_source(store, frames):
    assert len(store) == len(frames) == 15
    assert store.cutoff == CUTOFF
    for i, (got, want) in enumerate(zip(store, frames)):
        for field in ("numbers", "positions", "cell", "pbc", "forces", "virial"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), (i, field)
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"frame {i} {field}")
        assert got.energy == want.energy and got.source == want.source == store.name(i)
    assert store[6].energy is None and store[6].forces is None and store[6].virial is None  # the molecule
    np.testing.assert_array_equal(store.n_atoms, [f.natoms for f in frames])


def test_edge_counts_are_those_of_the_graphs(store, frames):
    direct = [int(labelled_graph(f, TYPE_MAP, CUTOFF).n_edge[0]) for f in frames]
    np.testing.assert_array_equal(store.n_edges, direct)
    np.testing.assert_array_equal(InMemoryFrames(frames, CUTOFF, workers=0).n_edges, direct)
    assert store.n_edges.min() > 0 and store.n_edges.dtype == np.int64


def test_store_pickles_as_its_path(store):
    blob = pickle.dumps(store)
    assert len(blob) < 500  # the path, not the arrays
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again[3].positions, store[3].positions)


def test_compositions_give_the_energy_bias_of_the_frames(store, frames):
    """The energy-bias fit reads only numbers and energies from a store: the same bias as from the frames."""
    np.testing.assert_allclose(energy_bias(store, TYPE_MAP, seed=0), fit_energy_bias(frames, TYPE_MAP), rtol=1e-12)
    assert set(store.elements()) == {int(z) for f in frames for z in f.numbers}


def plan(n_frames: int) -> list[BatchSpec]:
    """Steps of two sub-batches ("devices") of 2-3 frames, one budget."""
    order = np.random.default_rng(0).permutation(n_frames)
    return [BatchSpec((order[k:k + 2], order[k + 2:k + 5]), graphs.Budget(n_node=128, n_edge=16384, n_graph=4))
            for k in range(0, n_frames - 4, 5)]


def direct_batch(frames, spec: BatchSpec):
    subs = [graphs.pad(jraph.batch_np([labelled_graph(frames[i], TYPE_MAP, CUTOFF) for i in idx]), spec.budget)
            for idx in spec.frames]
    return jax.tree.map(lambda *x: np.stack(x), *subs)


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_batches_are_the_same_with_threads_workers_and_in_memory(store, frames):
    items = plan(len(store))
    direct = [direct_batch(frames, spec) for spec in items]
    assert direct[0].n_node.shape == (2, 4) and direct[0].nodes["positions"].shape == (2, 128, 3)
    assert_same_batches(list(load_batches(store, items, TYPE_MAP, CUTOFF, workers=0)), direct)
    assert_same_batches(list(load_batches(store, items, TYPE_MAP, CUTOFF, workers=2)), direct)
    assert_same_batches(list(load_batches(InMemoryFrames(frames, CUTOFF, workers=0), items, TYPE_MAP, CUTOFF)),
                        direct)
    resumed = list(load_batches(store, items[2:], TYPE_MAP, CUTOFF, workers=0))  # resume = start at item k
    assert_same_batches(resumed, direct[2:])


def test_an_empty_sub_batch_is_all_padding(store, frames):
    budget = graphs.Budget(n_node=128, n_edge=16384, n_graph=4)
    (batch,) = load_batches(store, [BatchSpec((np.array([3, 9]), np.array([], int)), budget)], TYPE_MAP, CUTOFF)
    full, empty = (jax.tree.map(lambda x, k=k: x[k], batch) for k in (0, 1))
    alone = direct_batch(frames, BatchSpec((np.array([3, 9]),), budget))
    assert_same_batches([full], [jax.tree.map(lambda x: x[0], alone)])
    assert not jraph.get_graph_padding_mask(empty).any() and not jraph.get_node_padding_mask(empty).any()
    assert empty.nodes["positions"].shape == (128, 3) and not empty.nodes["force_mask"].any()


def test_a_bad_frame_in_a_worker_is_named(store):
    items = [BatchSpec((np.array([6]),), graphs.Budget(128, 16384, 4)),  # the water molecule: fine
             BatchSpec((np.array([8]),), graphs.Budget(128, 16384, 4))]
    no_nickel = tuple(s for s in TYPE_MAP if s != store[8].to_atoms().get_chemical_symbols()[0])
    with pytest.raises(ValueError, match=store.name(8).replace(".", r"\.") + ".*not in the model's type map"):
        list(load_batches(store, items, no_nickel, CUTOFF, workers=1))
    too_small = [BatchSpec((np.array([0, 1]),), graphs.Budget(8, 256, 4))]
    with pytest.raises(graphs.GraphError, match=store.name(0).replace(".", r"\.") + ".*does not fit"):
        list(load_batches(store, too_small, TYPE_MAP, CUTOFF, workers=0))
    with pytest.raises(ValueError, match="cutoff 4.0.*cutoff 5.0"):
        load_batches(store, items, TYPE_MAP, 5.0)


def test_prepare_is_atomic(sources, tmp_path):
    bad = tmp_path / "bad.json"
    record = mptrj_record(make_emt_dataset(1)[0])
    bad.write_text(json.dumps({"mp-1": {"ok": record, "broken": {**record, "force": [[0.0, 0.0]]}}}))
    with pytest.raises(FrameError, match="bad.json:mp-1/broken"):
        prepare([sources[0], bad], tmp_path / "s", CUTOFF, workers=0, progress=False)
    assert list(tmp_path.iterdir()) == [bad]  # no store, no partial directory
    prepare_cli([str(sources[0]), str(tmp_path / "s"), "--cutoff", str(CUTOFF), "--workers", "0",
                 "--max-frames", "3"])
    assert len(FrameStore.open(tmp_path / "s")) == 3
    with pytest.raises(FileExistsError, match="already exists"):
        prepare(sources[0], tmp_path / "s", CUTOFF, workers=0, progress=False)
    prepare_cli([str(bad), str(tmp_path / "skipped"), "--cutoff", str(CUTOFF), "--workers", "0",
                 "--on-bad-frame", "skip"])  # the readers' bad-frame policy passes through
    skipped = FrameStore.open(tmp_path / "skipped")
    assert len(skipped) == 1 and skipped.name(0).endswith("mp-1/ok")


def test_synthetic_mptrj_has_crystals_of_8_to_100_atoms(tmp_path):
    path = write_synthetic_mptrj(tmp_path / "synthetic.json", 40, seed=1)
    frames = list(read_frames(path))
    assert len(frames) == 40
    assert all(8 <= f.natoms <= 100 and f.pbc.all() for f in frames)
    assert all(f.energy is not None and f.forces is not None and f.virial is not None for f in frames)
    assert len({f.source.split(":")[-1].split("/")[0] for f in frames}) > 2  # several materials
    nearest = [graphs.neighbor_list(f.positions, f.cell, f.pbc, 1.2)[0].size for f in frames[:10]]
    assert sum(nearest) == 0  # no atoms on top of each other
