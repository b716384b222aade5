//! (fixture under construction)
