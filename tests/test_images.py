"""The labelled image grid (``sample.images.make_labelled_grid``): column headers and row labels are drawn, the
cells land where ``make_grid`` puts them, and a wrong number of labels is an error naming the counts."""
import numpy as np
import pytest

from bifrost_jax.sample.images import make_grid, make_labelled_grid

COLUMNS = ["ground truth", "Bifrost", "FLUX alone", "reconstruction"]


def _cells(rows, cols, size=48):
    """Mid-grey cells: no text pixel (black) can come from them."""
    return np.full((rows * cols, size, size, 3), 128, np.uint8)


def _ink(region):
    return int(np.sum(np.all(region < 64, axis=-1)))


def test_headers_and_row_labels_are_drawn_around_the_plain_grid():
    cells = _cells(2, 4)
    plain = make_grid(cells, cols=4)
    grid = make_labelled_grid(cells, COLUMNS, ["a red circle to the left of a blue square", "two green triangles"],
                              label_width=160)
    h, w = plain.shape[:2]
    header = grid.shape[0] - h
    assert header > 0 and grid.shape[1] == 160 + 2 + w
    # the plain grid sits in the bottom-right corner, unchanged
    np.testing.assert_array_equal(grid[header:, -w:], plain)
    # text in the header above every column, and in the label area beside every row
    for c in range(4):
        x0 = 160 + 2 + c * (48 + 2)
        assert _ink(grid[:header, x0:x0 + 48]) > 10, COLUMNS[c]
    for r in range(2):
        y0 = header + r * (48 + 2)
        assert _ink(grid[y0:y0 + 48, :160]) > 10
    # the top-left corner (above the labels, left of the headers) stays blank
    assert _ink(grid[:header, :160]) == 0


def test_long_labels_wrap_and_different_labels_draw_differently():
    cells = _cells(1, 4)
    short = make_labelled_grid(cells, COLUMNS, ["two squares"], label_width=160)
    long = make_labelled_grid(cells, COLUMNS, ["a red circle to the left of a blue square"], label_width=160)
    assert short.shape == long.shape
    label = slice(None), slice(0, 160)
    assert not np.array_equal(short[label], long[label])
    rows_with_ink = np.flatnonzero(np.any(np.all(long[label] < 64, axis=-1), axis=1))
    assert rows_with_ink.max() - rows_with_ink.min() > 15  # more than one line of the ~11 px font


def test_label_count_must_match_the_cells():
    with pytest.raises(ValueError, match="3 row labels x 4 column labels need 12 images"):
        make_labelled_grid(_cells(2, 4), COLUMNS, ["a", "b", "c"])
