"""The page's control ranges are the ones SamplingParams accepts: each end passes, one step past fails."""
import pytest

from chatglm3.params import SamplingParams, SettingsError
from chatglm3.webchat import page_settings


@pytest.mark.parametrize("field", ["temperature", "top_p", "max_tokens"])
def test_limits_are_the_apis(field):
    s = page_settings()[field]
    step = 1 if field == "max_tokens" else 1e-3
    SamplingParams(**{field: s["min"]})
    SamplingParams(**{field: s["max"]})
    assert getattr(SamplingParams(), field) == s["default"]
    for outside in (s["min"] - step, s["max"] + step):
        with pytest.raises(SettingsError, match=field):
            SamplingParams(**{field: outside})
