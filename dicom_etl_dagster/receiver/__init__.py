"""The DICOM C-STORE receiver: a storage SCP that files what a modality or PACS sends into a
folder the new-file sensor watches (``dicom-etl-receiver``, or ``python -m
dicom_etl_dagster.receiver``).

It is a program of its own, beside the Dagster deployment, and imports no Dagster:
``store`` decides where an instance goes and writes it, ``scp`` speaks DICOM (pynetdicom),
``cli`` parses the command line and handles the signals.
"""
