"""The DICOM outputs of a QC job, one module per IOD (as in highdicom).

* ``seg``: the QC SEG (BINARY, segments by verdict, coloured);
* ``sr``: the Comprehensive 3D SR following TID 1500;
* ``pmap``: the Parametric Map of the ensemble uncertainty map (optional);
* ``codes``: the coded concepts (standard and the private 99QCGATE scheme);
* ``validate``: dciodvfy checks.
"""
