"""The shared vocabulary at the bottom of the package: every stage imports from here, never upward.

``results`` the decision contract (Verdict, SliceResult, CaseResult) and the verdict rule;
``agreement`` Dice, DSC Lesion and ensemble agreement; ``dicom`` SOP classes, value-representation
lengths and the instance header; ``layout`` the data directory's folders; ``refusals`` why an
instance is refused and the DIMSE status that says so. Nothing here imports another qcgate package
but ``errors``.
"""
