"""A coordinator that buys validations of weights it chooses with almost-free trained rounds (new run
names, the highest σ the policy allows, a batch of one) is stopped by the site's daily count."""

from flwr.app import MessageType

from tests.test_guard import _call, _guard, _weights

pytestmark = __import__("pytest").mark.usefixtures("task_identity")


def test_cheap_trained_rounds_do_not_buy_unlimited_validations(tiny_site, tmp_path):
    guard = _guard(tmp_path, tiny_site, validations_per_day=2)
    cheap = {"noise-multiplier": 50.0, "batch-size": 1}
    chosen = None
    reasons = []
    for run in range(1, 4):  # each run: round 1 trains almost for free, round 2 asks to score the weights it sends
        trained = _call(guard, MessageType.TRAIN, 1, run=run, **cheap)
        assert trained.content["site"]["status"] == "ok"
        chosen = chosen or _weights(trained)  # the attacker sends its own weights, not the site's
        reasons.append(_call(guard, MessageType.TRAIN, 2, run=run, weights=chosen, validate_received=True, **cheap)
                       .content["validation-site"]["reason"])
    assert guard.spent() < 0.5  # the rounds really were cheap: ε is no brake here
    assert reasons == ["", "", "validation_limit"]
    validations = [e for e in guard.ledger.entries if e["kind"] == "validate"]
    assert len(validations) == 2
