"""What each kind bought on the "does it pay?" benchmark, shown by ``dynconv kinds``.

Written by ``python benchmarks/pays.py report`` from the final records in benchmarks/results/
(tests/test_pays.py checks the two agree); edit the benchmark, not this file.
"""

PAYS: dict[str, str] = {
    "dcd": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, +1 epoch(s), 3 seeds "
        "(benchmarks/results/pays.md): test 81.95 ± 0.34 % vs static continued 82.54 ± 0.45 % "
        "(-0.60 ± 0.30 points), 1.23x static's time per epoch"
    ),
    "dyconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, +1 epoch(s), 3 seeds "
        "(benchmarks/results/pays.md): test 82.55 ± 0.44 % vs static continued 82.54 ± 0.45 % "
        "(+0.00 ± 0.05 points), 1.98x static's time per epoch"
    ),
    "dynet": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, +1 epoch(s), 3 seeds "
        "(benchmarks/results/pays.md): test 82.54 ± 0.47 % vs static continued 82.54 ± 0.45 % "
        "(-0.00 ± 0.06 points), 2.91x static's time per epoch"
    ),
    "odconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, +1 epoch(s), 3 seeds "
        "(benchmarks/results/pays.md): test 82.52 ± 0.54 % vs static continued 82.54 ± 0.45 % "
        "(-0.02 ± 0.17 points), 1.79x static's time per epoch"
    ),
    "condconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, +1 epoch(s), 3 seeds "
        "(benchmarks/results/pays.md): test 45.58 ± 34.12 % vs static continued 82.54 ± 0.45 % "
        "(-36.96 ± 34.57 points), 1.43x static's time per epoch"
    ),
}
