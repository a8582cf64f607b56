import pytest
from pydicom.dataset import Dataset

from osteoscreen.config import Routing
from osteoscreen.node.routing import classify

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"


def header(**kw):
    ds = Dataset()
    ds.SOPClassUID = kw.pop("sop", DX)
    ds.Modality = kw.pop("Modality", "DX")
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("kw, expected", [
    (dict(BodyPartExamined="PELVIS", ViewPosition="AP"), (True, "hip", "ap")),
    (dict(BodyPartExamined="HIP", ViewPosition="AP", sop=CR, Modality="CR"), (True, "hip", "ap")),
    (dict(BodyPartExamined="LSPINE", ViewPosition="LL"), (True, "lumbar", "lat")),
    (dict(StudyDescription="XR LUMBAR SPINE 2 VIEWS", SeriesDescription="L-SPINE AP"), (True, "lumbar", "ap")),
    (dict(ProtocolName="Becken a.p.", ViewPosition="AP"), (True, "hip", "ap")),
])
def test_screening_candidates(kw, expected):
    d = classify(header(**kw), Routing())
    assert (d.eligible, d.region, d.view) == expected and d.reason is None


@pytest.mark.parametrize("kw, reason_part", [
    (dict(BodyPartExamined="CHEST", ViewPosition="PA"), "body part"),
    (dict(BodyPartExamined="PELVIS", ViewPosition="AP", Modality="CT"), "modality CT"),
    (dict(BodyPartExamined="PELVIS", ViewPosition="AP", sop="1.2.840.10008.5.1.4.1.1.2"), "not a radiograph"),
    (dict(BodyPartExamined="HIP", ViewPosition="LL"), "AP view"),
    (dict(BodyPartExamined="LSPINE"), "view"),
])
def test_not_candidates_have_a_reason(kw, reason_part):
    d = classify(header(**kw), Routing())
    assert not d.eligible and reason_part in d.reason
