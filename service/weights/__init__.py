"""The weights on disk: which to load (resolve), where they come from (source, fetch, download), what they are
(files, check) and what was downloaded (manifest). Everything here but the Real-ESRGAN check is torch-free, so
that `python -m service weights ...` answers in a second."""
