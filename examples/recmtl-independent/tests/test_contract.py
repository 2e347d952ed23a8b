from recmtl.testing import check_tower
from recmtl_independent import IndependentTowers


def test_contract():
    check_tower(IndependentTowers, units=[16])
