"""``python -m dicom_etl_dagster.receiver``: the same program as the ``dicom-etl-receiver`` script."""

from dicom_etl_dagster.receiver.cli import main

raise SystemExit(main())
