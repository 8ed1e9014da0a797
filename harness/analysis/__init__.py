"""From finished runs to conclusions: reading run directories (runs), the collector (collect), power-law
fits (fit), plots, report tables, and the papers' reference tables (reference, tables)."""
