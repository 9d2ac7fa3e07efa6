"""The XML LabelTable NIfTI extension that TotalSegmentator writes with ``--ml``.

TotalSegmentator (``nifti_ext_header.add_label_map_to_nifti``) stores the
label names of a multilabel mask as a Caret/CIFTI-style ``<CaretExtension>``
XML document in a NIfTI header extension with code 0. We write the same
document, so tools that read TotalSegmentator's files read ours, and read
it back with the standard library's XML parser.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Mapping

import nibabel as nib

# TotalSegmentator's palette: label id modulo 12 picks the colour
PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0),
           (255, 0, 128), (128, 255, 128), (0, 128, 255), (128, 128, 128), (185, 170, 155))
EXTENSION_CODE = 0  # what TotalSegmentator uses (not Caret's registered code 30)


def label_table_xml(label_map: Mapping[int, str]) -> str:
    """The CaretExtension XML for ``{label id: name}``."""
    rows = []
    for key, name in label_map.items():
        if "]]>" in name:
            raise ValueError(f"label name {name!r} cannot be stored in CDATA")
        r, g, b = PALETTE[int(key) % len(PALETTE)]
        rows.append(f'<Label Key="{int(key)}" Red="{r / 255}" Green="{g / 255}" Blue="{b / 255}" Alpha="1">'
                    f'<![CDATA[{name}]]></Label>\n')
    head = ('<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T05:45:09]]></Date>'
            '   <VolumeInformation Index="0">   <LabelTable>')
    tail = ('  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType><![CDATA[Label]]>'
            '</VolumeType>   </VolumeInformation></CaretExtension>')
    return head + "\n" + "".join(rows) + "\n" + tail + "\n              "


def add_label_table(img, label_map: Mapping[int, str]):
    """Append the label table extension to a nibabel NIfTI image (in place) and return it."""
    img.header.extensions.append(nib.nifti1.Nifti1Extension(EXTENSION_CODE,
                                                            label_table_xml(label_map).encode("utf-8")))
    return img


def parse_label_table(xml: str | bytes) -> dict[int, str]:
    """``{label id: name}`` from a CaretExtension document; raises ValueError if it is not one."""
    if isinstance(xml, bytes):
        xml = xml.decode("utf-8")
    try:
        root = ET.fromstring(xml.strip())
    except ET.ParseError as e:
        raise ValueError(f"not an XML label table: {e}") from e
    if root.tag != "CaretExtension":
        raise ValueError(f"not a CaretExtension document (root element {root.tag!r})")
    table = root.find("./VolumeInformation/LabelTable")
    if table is None:
        raise ValueError("CaretExtension without a LabelTable")
    return {int(el.attrib["Key"]): (el.text or "") for el in table.findall("Label")}


def read_label_table(img_or_path) -> dict[int, str]:
    """The label table of a NIfTI image or file ({} if it has none)."""
    img = nib.load(str(img_or_path)) if isinstance(img_or_path, (str, Path)) else img_or_path
    for ext in img.header.extensions:
        try:
            return parse_label_table(ext.get_content())
        except (ValueError, UnicodeDecodeError):
            continue
    return {}
