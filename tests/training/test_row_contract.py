"""The oracle records its row contract (which sidecar row a position reads); the loss and the probes
read it from the oracle, and the cells and probes of one oracle share one device copy of its sidecar."""

import torch

from ablate.config.spec import load_spec
from ablate.oracle import files as oracle_files
from ablate.oracle.hashing import RowContract, canonical_rows
from ablate.pipeline import stages
from ablate.training import cells as cellmod
from oracle_fixtures import ROOT, VOCAB, write_reference_oracle

TINY = load_spec(ROOT / "specs" / "demo.toml", [], "tiny")


def imported(tmp_path, seeds=(7, 99, 137, 251)):
    files = write_reference_oracle(tmp_path, seeds=list(seeds))
    spec = TINY.model_copy(update={"oracle": TINY.oracle.model_copy(update={
        "source": "files", "seeds": list(seeds), **{k: str(v) for k, v in files.items()}})})
    return spec, oracle_files.import_oracle(spec.oracle, VOCAB)


def test_the_oracle_records_its_contract_and_the_cells_and_probes_read_it(tmp_path):
    spec, oracle = imported(tmp_path)
    assert oracle.stats["row_contract"] == {"rows": spec.oracle.rows, "seed": 7}  # the first hash seed
    variants = cellmod.oracle_variants(oracle, spec)
    assert {v.contract for v in variants.values()} == {oracle.row_contract}
    cfg = cellmod.train_config(spec, spec.cells[0], variants["real"].contract)
    assert cfg.row_contract == RowContract(rows=spec.oracle.rows, seed=7)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(cfg.row_contract.rows_of(tokens), canonical_rows(tokens, spec.oracle.rows, 7))


def test_an_oracle_cached_before_the_record_reads_the_same_contract(tmp_path):
    _, oracle = imported(tmp_path)
    recorded = oracle.row_contract
    del oracle.stats["row_contract"]
    assert oracle.row_contract == recorded  # rows from the table, seed from hash_seeds[0]


def test_one_device_copy_of_each_sidecar(tmp_path):
    spec, oracle = imported(tmp_path)
    variants = cellmod.oracle_variants(oracle, spec)
    real, shuf, gauss = (variants[k] for k in ("real", "shuffled", "gaussian"))
    meta = torch.device("meta")  # a device other than the host's, without allocating
    first = real.sidecar_on(meta)
    assert real.sidecar_on(meta) is first  # consecutive cells of a variant read one copy
    assert shuf.sidecar_on(meta) is gauss.sidecar_on(meta)  # the controls share their sidecar
    assert len(real.copies) == 1  # the cache never holds a second [N, V] tensor on the device
    assert real.sidecar_on("cpu") is real.sidecar  # on the host: the tensor itself
    assert stages.oracle_config(spec).seeds[0] == real.contract.seed
