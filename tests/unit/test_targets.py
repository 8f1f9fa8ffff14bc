"""Unit tests of target generation (``worker.targets.make_target``)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from producer.errors import InvalidEventError, ItrainError, TargetError
from producer.settings import DEFAULT_TARGETS
from tests.helpers import make_interaction
from worker.engine.targets import make_target, make_targets


def test_list_label_is_used_when_given() -> None:
    """An explicit label overrides the action mapping."""
    # Given a 'dismiss' event (mapped to 0.0) with an explicit label
    ev = make_interaction(action_type="dismiss", label=[0.25, 0.75, 1.0])
    # When its target is made for a 3-output model
    t = make_target(ev, 3, DEFAULT_TARGETS)
    # Then the target is the label
    assert t.dtype == np.float64
    assert t.tolist() == [0.25, 0.75, 1.0]


def test_scalar_label_is_one_output() -> None:
    """A scalar label is the target of a 1-output model."""
    # Given a 'click' event (mapped to 1.0) with a scalar label
    ev = make_interaction(action_type="click", label=0.3)
    # When its target is made for a 1-output model
    t = make_target(ev, 1, DEFAULT_TARGETS)
    # Then the target is the label
    assert t.tolist() == [0.3]


def test_label_of_unknown_action_is_used() -> None:
    """An action with no mapping trains fine when the event carries a label."""
    # Given an unmapped action with a label
    ev = make_interaction(action_type="hover", label=0.6)
    # When its target is made
    t = make_target(ev, 1, DEFAULT_TARGETS)
    # Then the label is the target
    assert t.tolist() == [0.6]


@pytest.mark.parametrize(
    ("label", "outputs"),
    [(0.5, 3), ([0.1, 0.2], 3), ([0.1, 0.2, 0.3, 0.4], 2), ([0.5], 2), ([0.1, 0.2], 1)],
)
def test_label_length_mismatch_names_both_lengths(label, outputs) -> None:
    """A label whose length is not the model's output count is refused, naming both lengths."""
    # Given an event whose label length differs from the model's outputs
    ev = make_interaction(label=label)
    n = 1 if isinstance(label, float) else len(label)
    # When its target is made
    with pytest.raises(TargetError) as info:
        make_target(ev, outputs, DEFAULT_TARGETS)
    # Then the error names both lengths
    msg = str(info.value)
    assert re.search(rf"\b{n}\b", msg), msg
    assert re.search(rf"\b{outputs}\b", msg), msg
    assert "label" in msg


@pytest.mark.parametrize(
    ("action", "value"),
    [("purchase", 1.0), ("click", 1.0), ("like", 1.0), ("view", 0.5), ("dismiss", 0.0), ("skip", 0.0)],
)
@pytest.mark.parametrize("outputs", [1, 4])
def test_default_mapping_broadcast_to_all_outputs(action, value, outputs) -> None:
    """Without a label the action's default value is the target of every output."""
    # Given an event without a label
    ev = make_interaction(action_type=action)
    # When its target is made
    t = make_target(ev, outputs, DEFAULT_TARGETS)
    # Then every output gets the mapped value
    assert t.dtype == np.float64
    assert t.tolist() == [value] * outputs


def test_unknown_action_without_label_names_the_action() -> None:
    """No mapping and no label: refused, never a made-up value."""
    # Given an unmapped action without a label
    ev = make_interaction(action_type="hover-zz9")
    # When its target is made
    with pytest.raises(TargetError) as info:
        make_target(ev, 1, DEFAULT_TARGETS)
    # Then the error names the action, and is one of the project's errors
    assert "hover-zz9" in str(info.value)
    assert isinstance(info.value, ItrainError)
    assert isinstance(info.value, InvalidEventError)


def test_custom_mapping_replaces_defaults() -> None:
    """A custom mapping is used as given: its actions map, others are unknown."""
    # Given a custom mapping
    mapping = {"hover": 0.25, "click": 0.8}
    # When targets are made with it
    hover = make_target(make_interaction(action_type="hover"), 2, mapping)
    click = make_target(make_interaction(action_type="click"), 2, mapping)
    # Then its values are used
    assert hover.tolist() == [0.25, 0.25]
    assert click.tolist() == [0.8, 0.8]
    # And an action only the defaults know is unknown here
    with pytest.raises(TargetError, match="purchase"):
        make_target(make_interaction(action_type="purchase"), 2, mapping)


def test_target_is_a_fresh_array() -> None:
    """Changing a returned target does not change the mapping's next answer."""
    # Given a target made from the mapping
    t = make_target(make_interaction(action_type="view"), 2, DEFAULT_TARGETS)
    # When it is modified
    t[:] = 9.0
    # Then the next target is unaffected
    assert make_target(make_interaction(action_type="view"), 2, DEFAULT_TARGETS).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("outputs", [1, 2, 3])
def test_make_targets_equals_make_target_row_by_row(outputs) -> None:
    """The batch form gives each event make_target's row, or its error, for every kind of event."""
    # Given mapped actions, an unmapped one, and labels of every length
    events = [
        make_interaction(action_type="click"),
        make_interaction(action_type="hover"),
        make_interaction(action_type="view", label=0.3),
        make_interaction(action_type="hover", label=[0.1, 0.2]),
        make_interaction(action_type="dismiss", label=[0.4, 0.5, 0.6]),
        make_interaction(action_type="skip"),
    ]
    # When made together
    Y, errors = make_targets(events, outputs, DEFAULT_TARGETS)
    # Then each row is make_target's, and each refusal its error, message and all
    assert Y.shape == (len(events), outputs)
    assert Y.dtype == np.float64
    for i, ev in enumerate(events):
        if i in errors:
            with pytest.raises(type(errors[i]), match=re.escape(str(errors[i]))):
                make_target(ev, outputs, DEFAULT_TARGETS)
        else:
            assert Y[i].tolist() == make_target(ev, outputs, DEFAULT_TARGETS).tolist()
    assert len(errors) == 3  # the unmapped action, and the two labels of another length


def test_make_targets_of_no_events() -> None:
    Y, errors = make_targets([], 2, DEFAULT_TARGETS)
    assert Y.shape == (0, 2)
    assert errors == {}
