"""The HTTP routes, one router per area: ``service`` (the page, health, models, benchmark
results), ``images`` (segment one image, fetch its pictures) and ``videos`` (video jobs)."""
