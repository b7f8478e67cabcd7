"""What each kind bought on the "does it pay?" benchmark, shown by ``dynconv kinds``.

Written by ``python benchmarks/pays.py report`` from the final records in benchmarks/results/
(tests/test_pays.py checks the two agree); edit the benchmark, not this file.
"""

PAYS: dict[str, str] = {
    "condconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, 4000 training images, +2 epoch(s), 3 seeds, adamw"
        " (benchmarks/results/pays.md): test 82.81 ± 0.11 % vs static continued 82.72 ± 0.12 % "
        "(+0.09 ± 0.09 points), 4.01x static's time per epoch; also Fashion-MNIST, "
        "mobilenet_v3_small 48 px, 20000 training images, +2 epoch(s), 3 seeds, adamw calibrate=4 "
        "(benchmarks/results/pays.md): test 89.53 ± 0.04 % vs static continued 89.58 ± 0.19 % "
        "(-0.05 ± 0.16 points), 1.89x static's time per epoch"
    ),
    "dyconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, 4000 training images, +2 epoch(s), 3 seeds, adamw"
        " (benchmarks/results/pays.md): test 82.71 ± 0.12 % vs static continued 82.72 ± 0.12 % "
        "(-0.01 ± 0.01 points), 5.55x static's time per epoch"
    ),
    "dynet": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, 4000 training images, +2 epoch(s), 3 seeds, adamw"
        " (benchmarks/results/pays.md): test 82.73 ± 0.09 % vs static continued 82.72 ± 0.12 % "
        "(+0.01 ± 0.04 points), 6.93x static's time per epoch"
    ),
    "dcd": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, 4000 training images, +2 epoch(s), 3 seeds, adamw"
        " (benchmarks/results/pays.md): test 82.76 ± 0.09 % vs static continued 82.72 ± 0.12 % "
        "(+0.04 ± 0.03 points), 7.08x static's time per epoch"
    ),
    "odconv": (
        "Fashion-MNIST, mobilenet_v3_small 48 px, 4000 training images, +2 epoch(s), 3 seeds, adamw"
        " (benchmarks/results/pays.md): test 82.70 ± 0.13 % vs static continued 82.72 ± 0.12 % "
        "(-0.02 ± 0.02 points), 6.51x static's time per epoch"
    ),
}
