//! Model files (todo)
