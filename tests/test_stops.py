from dscoder.stops import StopMatcher


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True, m
    out.append(m.finish())
    return "".join(out), False, m


def test_stop_split_across_pieces_is_never_emitted():
    text, hit, m = feed_all(["\n\n"], ["a\n", "\nb"])
    assert (text, hit) == ("a", True) and m.text == "a"


def test_held_back_prefix_is_released_when_it_does_not_match():
    m = StopMatcher(["END"])
    assert m.feed("xE") == ("x", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)


def test_finish_releases_the_held_back_text():
    text, hit, _ = feed_all(["END"], ["abc", "EN"])
    assert (text, hit) == ("abcEN", False)


def test_earliest_of_several_stops_wins():
    text, hit, _ = feed_all(["bb", "a"], ["xxbba"])
    assert (text, hit) == ("xx", True)


def test_no_stops_passes_everything_through():
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False) and m.finish() == ""
