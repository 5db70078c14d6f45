"""Tools over whole streams: inspect's statistics (stats), extract and generate --from
(extracted), synthetic guests (synthetic), the built-in demo (demo)."""
