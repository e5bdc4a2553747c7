"""What proves a finished bundle for validate, above the export: the checkpoint's weights found in the bundle
(weights). The export's own verification (bundle_check, quality) lives in export/."""
