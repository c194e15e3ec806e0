"""hiernet.catalogue: CSV rows → checked images with safe node ids; bad rows skipped with line and reason."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from conftest import draw_image
from hiernet.catalogue import CatalogueSpec, load_catalogue, node_ids, parse_label, read_rows
from hiernet.hierarchy import is_safe_folder_name
from hiernet.safeio import UserError

COLS = ["id", "master", "sub", "article"]


def write_csv(path: Path, header: list[str], rows: list[list[str]], encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def spec(path: Path, **kw) -> CatalogueSpec:
    kw.setdefault("label_columns", COLS[1:])
    return CatalogueSpec(path, kw.pop("image_column", "image"), **kw)


@pytest.fixture
def shop(tmp_path) -> Path:
    """A catalogue with every kind of good and bad row; line numbers noted per row."""
    imgs = tmp_path / "images"
    for i in range(9):
        draw_image(imgs / f"{i}.jpg", ("ellipse", "rectangle")[i % 2], i, size=24)
    (imgs / "broken.jpg").write_text("<html>not an image</html>")
    (imgs / "copy_of_0.jpg").write_bytes((imgs / "0.jpg").read_bytes())
    rows = [
        ["1", "Apparel", "Topwear", "Tshirts", "images/0.jpg", "Nike \"Dri-FIT\" tee,\nwhite"],  # line 2-3
        ["2", "Apparel", "Topwear", "Shirts", "images/1.jpg", "plain"],          # 4
        ["3", "Apparel", "Bottom wear", "", str(imgs / "2.jpg"), "partial"],       # 5: absolute path, partial
        ["4", "Apparel", "", "Jeans", "images/3.jpg", "gap"],                      # 6: empty level before a filled one
        ["5", "", "", "", "images/4.jpg", "no label"],                             # 7
        ["6", "Apparel", "Topwear", "Tshirts", "images/nope.jpg", "missing"],      # 8
        ["7", "Apparel", "Topwear", "Tshirts", "images/broken.jpg", "broken"],     # 9
        ["2", "Apparel", "Topwear", "Shirts", "images/5.jpg", "duplicate id"],     # 10
        ["8", "Apparel", "Topwear", "Tshirts", "images/copy_of_0.jpg", "same bytes, same label"],  # 11
        ["9", "Accessories", "Bags", "Tote", "images/6.jpg", "conflict a"],        # 12
        ["10", "Accessories", "Bags", "Clutch", "images/6.jpg", "conflict b"],     # 13
        ["11", "Bags & Co", "a b", "T-Shirts / Tops", "images/7.jpg", "unsafe"],   # 14
        ["12", "Bags & Co", "a_b", "x", "images/8.jpg", "clash"],                  # 15
        ["", "", "", "", "", ""],                                                   # 16: blank, ignored
    ]
    return write_csv(tmp_path / "shop.csv", COLS + ["image", "title"], rows)


def test_rows_and_line_numbers_with_quotes_and_newlines(shop):
    rows, skipped = read_rows(spec(shop, id_column="id"))
    assert rows[0].line == 2 and rows[0].labels == ["Apparel", "Topwear", "Tshirts"]
    assert rows[1].line == 4  # the quoted newline in row 1 took two lines
    assert rows[2].labels == ["Apparel", "Bottom wear"]  # empty trailing level: partial
    assert {s["line"]: s["reason"] for s in skipped} == {
        6: "empty category level 2 before a filled one in 'Apparel >  > Jeans'",
        7: "empty label",
    }


def test_load_catalogue_skips_bad_rows_with_line_and_reason(shop):
    got = load_catalogue(spec(shop, id_column="id"), progress=False)
    reasons = {s["line"]: s["reason"] for s in got.skipped}
    assert set(reasons) == {6, 7, 8, 9, 10, 11, 12, 13}
    assert "not found" in reasons[8] and "unreadable image" in reasons[9]
    assert "duplicate id '2' (first on line 4)" == reasons[10]
    assert "same image as line 2" in reasons[11]
    assert "different labels on lines 12, 13" in reasons[12] and "different labels" in reasons[13]
    kept = {e["line"]: (k, e) for k, e in got.extra.items()}
    assert sorted(kept) == [2, 4, 5, 14, 15]
    k0, e0 = kept[2]
    assert e0["id"] == "1" and e0["label"] == ["Apparel", "Topwear", "Tshirts"]
    assert got.hashes[k0] == hashlib.sha256(Path(k0).read_bytes()).hexdigest()
    assert got.groups["Apparel/Bottom_wear"] == [kept[5][0]]  # a partial label: an inner node's group
    assert got.splits is None


def test_safe_ids_keep_display_names(shop):
    got = load_catalogue(spec(shop), progress=False)
    nodes = set(got.groups)
    for nid in nodes:
        assert all(is_safe_folder_name(part) for part in nid.split("/"))
    assert "Bags_Co/a_b/T-Shirts__Tops" in nodes
    assert "Bags_Co/a_b-2/x" in nodes  # 'a b' and 'a_b' are distinct classes with distinct ids
    assert got.display["Bags_Co"] == "Bags & Co"
    assert got.display["Bags_Co/a_b/T-Shirts__Tops"] == "T-Shirts / Tops"
    assert got.display["Bags_Co/a_b-2"] == "a_b" and got.display["Bags_Co/a_b"] == "a b"
    assert "Apparel" not in got.display  # unchanged names need no entry


def test_node_ids_are_stable_and_unique():
    ids, display = node_ids([("A", "x y"), ("A", "x_y"), ("B", "x y"), ("A",)])
    assert ids[("A", "x y")] == "A/x_y" and ids[("A", "x_y")] == "A/x_y-2" and ids[("B", "x y")] == "B/x_y"
    assert ids[("A",)] == "A" and display == {"A/x_y": "x y", "A/x_y-2": "x_y", "B/x_y": "x y"}


@pytest.mark.parametrize("values, sep, want", [
    (["Apparel > Topwear > Tshirts"], " > ", ["Apparel", "Topwear", "Tshirts"]),
    (["Apparel > Topwear > "], " > ", ["Apparel", "Topwear"]),
    (["  Apparel>Topwear  "], ">", ["Apparel", "Topwear"]),
    (["a", "b", ""], None, ["a", "b"]),
])
def test_parse_label(values, sep, want):
    assert parse_label(values, sep) == (want, None)


def test_parse_label_errors():
    assert parse_label([""], " > ") == ([], "empty label")
    assert "empty category level 2" in parse_label(["A >  > C"], " > ")[1]


def test_missing_columns_listed(shop):
    with pytest.raises(UserError, match=r"no column 'articleType', 'sku'; its columns are: id, master, sub, article, image, title"):
        read_rows(spec(shop, label_columns=["master", "articleType"], id_column="sku"))


def test_bom_and_latin1(tmp_path):
    draw_image(tmp_path / "a.jpg", "ellipse", 1, size=32)
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffimage,cat\na.jpg,Caf\u00e9 > Cr\u00e8me\n".encode("utf-8"))
    rows, _ = read_rows(CatalogueSpec(p, "image", ["cat"], " > "))  # the BOM is not part of 'image'
    assert rows[0].labels == ["Caf\u00e9", "Cr\u00e8me"]
    p2 = tmp_path / "latin1.csv"
    p2.write_bytes("image,cat\na.jpg,ok\na.jpg,Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"line 3: bytes that are not utf-8-sig .*--encoding latin-1"):
        read_rows(CatalogueSpec(p2, "image", ["cat"]))
    rows, _ = read_rows(CatalogueSpec(p2, "image", ["cat"], encoding="latin-1"))
    assert rows[1].labels == ["Caf\u00e9"]
    with pytest.raises(UserError, match="unknown --encoding"):
        read_rows(CatalogueSpec(p2, "image", ["cat"], encoding="klingon"))


def test_not_csv_and_empty(tmp_path):
    p = tmp_path / "nul.csv"
    p.write_bytes(b"image,cat\n\"a.jpg,x\n")  # an unterminated quote at the end of the file
    with pytest.raises(UserError, match="not valid CSV"):
        read_rows(CatalogueSpec(p, "image", ["cat"]))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_rows(CatalogueSpec(tmp_path / "empty.csv", "image", ["cat"]))


def test_split_column(tmp_path):
    for i in range(4):
        draw_image(tmp_path / f"{i}.jpg", "ellipse", i, size=32)
    p = write_csv(tmp_path / "s.csv", ["image", "cat", "split"],
                  [["0.jpg", "a", "Train"], ["1.jpg", "a", "validation"], ["2.jpg", "b", " TEST "], ["3.jpg", "b", "holdout"]])
    got = load_catalogue(CatalogueSpec(p, "image", ["cat"], split_column="split"), progress=False)
    assert sorted(got.splits.values()) == ["test", "train", "val"]
    assert got.skipped == [{"line": 5, "reason": "split 'holdout' in column 'split' is not train, val or test"}]
