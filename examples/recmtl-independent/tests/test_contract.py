from recmtl_independent import IndependentTowers

from recmtl.testing import check_tower


def test_contract():
    check_tower(IndependentTowers, units=[16])
