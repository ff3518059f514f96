"""The project's own small trained model, whose final layer suppresses factual answers: a fast fixture for the
tests. `build` trains, measures and caches it (`recallfix demo-model`); `sizes`, `corpus`, `training`; `card.md`
is its model card template."""
