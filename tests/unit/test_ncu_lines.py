"""benchmarks/ncu_lines.py on a small source page in ncu's CSV form (`--page source --csv --print-source
cuda,sass`): which kernel line each instruction counts with, the sums per range of lines and the table.
Profiling itself needs a CUDA GPU and ncu."""

import csv

import pytest

from benchmarks.ncu_lines import KERNEL_FILE, SAMPLES, line_ranges, parse_args, read_source_page, table

HEADER = ["Line No", "Source", "Address", "Source", SAMPLES, "stall_barrier", "stall_long_sb", "stall_barrier (Not Issued)"]


def _write_page(path, files):
    """files: [(file path, [(line, [(address, samples, barrier, long_sb)])])] as ncu lists them."""
    with path.open("w", newline="") as out:
        writer = csv.writer(out, quoting=csv.QUOTE_ALL)
        for name, lines in files:
            writer.writerow(["File Path", name])
            writer.writerow(["Function Name", "chunk_dqkv_kernel"])
            writer.writerow(HEADER)
            for line, instructions in lines:
                writer.writerow([str(line), "source text", "-", "-", "-", "-", "-", "-"])
                for address, samples, barrier, long_sb in instructions:
                    writer.writerow(["", "", hex(address), "  SASS", str(samples), str(barrier), str(long_sb), "9"])
                writer.writerow(["", "", "...", "...", "-", "-", "-", "-"])


@pytest.fixture
def page(tmp_path):
    kernel = f"/tmp/tvm-debug/{KERNEL_FILE}"
    path = tmp_path / "page.csv"
    _write_page(path, [
        ("/site/cutlass/mma_sm90_gmma.hpp", [(53, [(0x30, 40, 0, 0), (0x38, 4, 0, 0)]), (60, [(0x08, 3, 0, 3)])]),
        (kernel, [(5, [(0x00, 10, 10, 0)]), (70, [(0x20, 6, 0, 6), (0x40, 2, 2, 0)]), (130, [(0x50, 5, 0, 5)])]),
    ])
    return path, kernel


def test_header_instructions_count_with_the_kernel_line_before_them(page):
    path, kernel = page
    instructions, recorded = read_source_page(path)
    assert recorded == kernel
    assert [(i.address, i.line, i.samples) for i in instructions] == [
        (0x00, 5, 10), (0x08, 5, 3), (0x20, 70, 6), (0x30, 70, 40), (0x38, 70, 4), (0x40, 70, 2), (0x50, 130, 5)
    ]
    assert instructions[1].stalls == {"barrier": 0, "long_sb": 3}  # the "(Not Issued)" column is not a reason


def test_ranges_sum_samples_and_stall_reasons(page):
    instructions, _ = read_source_page(page[0])
    assert line_ranges(instructions, 60) == [
        (0, 60, 13, {"barrier": 10, "long_sb": 3}),
        (60, 120, 52, {"barrier": 2, "long_sb": 6}),
        (120, 180, 5, {"barrier": 0, "long_sb": 5}),
    ]


def test_table_gives_shares_main_stalls_and_the_names_a_range_touches(page):
    instructions, _ = read_source_page(page[0])
    source = ["x"] * 200
    source[0] = "__global__ void k(const bfloat16_t* __restrict__ Cq, double* __restrict__ DB, float* __restrict__ X) {"
    source[1] = "  float bias_f[2];  float g_s_local_cast_3[2];"
    source[69] = "((bfloat16_t*)q_s)[i] = Cq[i] + bias_f[i]; AtomicAdd(DB + i, ((float*)g_s)[i] + g_s_local_cast_3[0]);"
    rows = table(instructions, source, lines=60, floor=0.1)
    assert rows[0] == f"70 samples; ranges of 60 lines of {KERNEL_FILE} with at least 10%"
    assert rows[3:] == [  # line 1 is in range 0-59; the names of line 70 in 60-119, X not among them
        "| 0-59 | 18.6% | barrier 14.3%, long_sb 4.3% | Cq DB X bias_f |",
        "| 60-119 | 74.3% | long_sb 8.6%, barrier 2.9% | Cq DB bias_f g_s q_s |",
    ]  # 120-179 holds 7.1%, under the floor


def test_lines_per_range_must_be_positive():
    with pytest.raises(SystemExit):
        parse_args(["table", "page.csv", "--lines", "0"])
    assert parse_args(["table", "page.csv"]).lines == 60


def test_run_names_an_unknown_shape():
    from benchmarks.ncu_lines import main

    with pytest.raises(SystemExit, match="unknown shape 'siso3'"):
        main(["run", "siso3"])
