"""Step 8 of a run: RUN/report.md (`markdown`) and its plots (`plots`), rendered from the typed `AnalysisResult`;
`format` is how numbers look in every report, compare's included."""
